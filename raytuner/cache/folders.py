"""A cache folder as a build finds it: its committed rows (after the encoder check), the shards a
killed build left, and the discovery index of what each file held.

Nothing here is deleted but raytuner's own files, and only what ``--rebuild`` or an interrupted
build leaves behind.
"""

from __future__ import annotations

import io
import logging
import posixpath
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raytuner.cache import format as fmt
from raytuner.cache.format import CacheError
from raytuner.cache.identity import describe
from raytuner.cache.keys import index_row_id
from raytuner.cache.settings import EncoderIdentity
from raytuner.data import discovery
from raytuner.data.discovery import Probe
from raytuner.storage import Location, is_temporary, list_files, write_bytes_atomic

logger = logging.getLogger(__name__)


def load_committed(
    folder: Location, *, kind: str, encoder: EncoderIdentity, rebuild: bool, what: str
) -> tuple[dict[str, dict[str, Any]], fmt.Manifest | None]:
    """The committed rows of a cache folder (row id -> index row), after the identity check."""
    manifest = fmt.read_manifest(folder)
    if manifest is None:
        return {}, None
    if manifest.kind != kind:
        raise CacheError(f"{folder}: holds a {manifest.kind} cache, not {kind}; give {what} its own folder")
    if manifest.encoder_key != encoder.key:
        if rebuild:
            remove_cache_files(folder)
            logger.warning("%s: cache written by %s removed (--rebuild)", folder, describe(manifest.encoder))
            return {}, None
        raise CacheError(
            f"{folder}: cache written by {describe(manifest.encoder)} (encoder key {manifest.encoder_key}), "
            f"but this run encodes with {describe(encoder.identity)} (key {encoder.key}); "
            f"point {what} at a new folder, or run `raytuner cache --rebuild` to re-encode it here"
        )
    index = fmt.read_index(folder, manifest)
    return {index_row_id(row): row for row in index.to_pylist()}, manifest


def remove_cache_files(folder: Location) -> None:
    """Delete raytuner's own files in a cache folder (never anything else there)."""
    filesystem, root = folder.resolve()
    for info in list_files(folder):
        relative = posixpath.relpath(info.path, root)
        name = posixpath.basename(relative)
        if name in (fmt.MANIFEST_NAME, fmt.REPORT_NAME, discovery.DISCOVERY_INDEX) or (
            name.endswith(".parquet") and (name.startswith(("index-", "part-", "pending-")))
        ):
            filesystem.delete_file(info.path)


def adopt_orphans(
    folder: Location, *, kind: str, encoder: EncoderIdentity, known: set[str]
) -> dict[str, dict[str, Any]]:
    """Whole shards a killed build wrote but never committed: key -> location. Temporary files are removed.

    Shards the training workers wrote back (vae_cache_ondemand) are adopted the same way.
    """
    adopted = uncommitted_shards(folder, kind=kind, encoder_key=encoder.key, known=known, tidy=True)
    if adopted:
        logger.info(
            "%s: %d row(s) from an interrupted build or the training workers adopted", folder, len(adopted)
        )
    return adopted


def uncommitted_shards(
    folder: Location, *, kind: str, encoder_key: str, known: set[str], tidy: bool
) -> dict[str, dict[str, Any]]:
    """The rows of whole ``part-*`` shards of ``kind`` by ``encoder_key`` that no index lists: key -> location.

    Only a build (``tidy``) removes temporary and unreadable files: a reader leaves them, as a
    training worker may be writing one at that moment.
    """
    filesystem, root = folder.resolve()
    adopted: dict[str, dict[str, Any]] = {}
    for info in list_files(folder):
        relative = posixpath.relpath(info.path, root)
        if is_temporary(relative):
            if tidy:
                filesystem.delete_file(info.path)
            continue
        name = posixpath.basename(relative)
        if not (name.startswith("part-") and name.endswith(".parquet")) or relative in known:
            continue
        metadata = fmt.read_shard_metadata(folder, relative)
        if metadata is None:
            if tidy:
                logger.warning("%s: unreadable shard %s removed", folder, relative)
                filesystem.delete_file(info.path)
            continue
        if (
            metadata.get(fmt.ENCODER_KEY_METADATA, b"").decode() != encoder_key
            or metadata.get(fmt.KIND_METADATA, b"").decode() != kind
        ):
            if tidy:
                logger.warning(
                    "%s: shard %s was written by another encoder; left in place, not used", folder, relative
                )
            continue
        keys = fmt.read_shard_columns(folder, relative, ["key"]).column("key").to_pylist()
        for location in fmt.shard_locations(keys, relative):
            adopted[location["key"]] = location
    return adopted


def read_discovery_index(folder: Location) -> dict[str, Probe]:
    filesystem, root = folder.resolve()
    path = posixpath.join(root, discovery.DISCOVERY_INDEX)
    try:
        if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
            return {}
        with filesystem.open_input_file(path) as handle:
            return discovery.probes_from_rows(pq.read_table(handle).to_pylist())
    except (OSError, pa.ArrowException):
        logger.warning("%s: unreadable %s; every file is read again", folder, discovery.DISCOVERY_INDEX)
        return {}


def write_discovery_index(folder: Location, probes: Iterable[Probe]) -> None:
    """Remember what each file held; failures that may pass (an unreadable file) are tried again next time."""
    table = pa.Table.from_pylist(
        discovery.probe_rows(probe for probe in probes if not probe.transient),
        schema=pa.schema(
            {
                "fingerprint": pa.string(),
                "sha256": pa.string(),
                "width": pa.int32(),
                "height": pa.int32(),
                "captions": pa.list_(pa.string()),
                "error": pa.string(),
            }
        ),
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    filesystem, root = folder.resolve()
    write_bytes_atomic(filesystem, posixpath.join(root, discovery.DISCOVERY_INDEX), buffer.getvalue())
