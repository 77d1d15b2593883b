"""The cache on disk: Parquet shards, their index, and the manifest that commits them.

One cache folder holds one kind of rows (``latents`` for one image dataset under its
``cache_dir_vae``, or ``text`` under the text-embeds dataset's ``cache_dir``)::

    raytuner_cache.json            the manifest, written last: the commit point
    index-<build>.parquet          key -> shard, row group, row (the live rows)
    bucket=1024x1024/part-*.parquet    latent shards, one aspect bucket each (``part-ondemand-*``:
                                   written back by training workers, see raytuner.cache.ondemand)
    pending-*.parquet              images left for the training workers to encode (no latents)
    part-*.parquet                 text shards

Every shard is written whole or not at all (a temporary name and a rename on local disks; an
object store shows an object only once its upload completes), and carries the encoder key in its
Parquet metadata, so a shard left behind by a killed build is adopted by the next one instead of
being encoded again. Readers only ever follow the manifest, so they never see a partial build.

A latent shard of an image dataset that links a mask dataset (``conditioning_data``) also holds
each row's loss mask, ``loss_mask`` (+ ``_shape``, ``_dtype``): float32 ``[h, w]`` on the latent
grid (the mask's red channel over 255, area-averaged over each latent pixel), beside the latent
it weights. Shards without those columns (no mask, or written before masks existed) still read.

Tensors are stored as raw little-endian bytes with their shape and dtype beside them, so plain
pyarrow and numpy read them back:
``np.frombuffer(row["latent"], row["latent_dtype"]).reshape(row["latent_shape"])``.
"""

from __future__ import annotations

import io
import json
import posixpath
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raytuner.errors import RaytunerError
from raytuner.storage import Location, StorageError, describe_error, read_bytes, write_bytes_atomic

FORMAT_NAME = "raytuner.cache"
FORMAT_VERSION = 1
MANIFEST_NAME = "raytuner_cache.json"
REPORT_NAME = "raytuner_cache_report.json"
ENCODER_KEY_METADATA = b"raytuner.encoder_key"
KIND_METADATA = b"raytuner.kind"
# Small row groups let a training rank read the few rows of its batch slice, not whole shards.
ROW_GROUP_SIZE = 16

LATENT_COLUMNS: dict[str, pa.DataType] = {
    "key": pa.string(),
    "dataset_id": pa.string(),
    "source": pa.string(),
    "bucket": pa.string(),
    "width": pa.int32(),
    "height": pa.int32(),
    "original_width": pa.int32(),
    "original_height": pa.int32(),
    "crop_left": pa.int32(),
    "crop_top": pa.int32(),
    "latent": pa.binary(),
    "latent_shape": pa.list_(pa.int32()),
    "latent_dtype": pa.string(),
}
TEXT_COLUMNS: dict[str, pa.DataType] = {
    "key": pa.string(),
    "prompt": pa.string(),
    "length": pa.int32(),
}
LOCATION_COLUMNS: dict[str, pa.DataType] = {"shard": pa.string(), "row_group": pa.int32(), "row": pa.int32()}
# An index row's key and where its row is: what a build carries over for rows it does not re-encode.
LOCATION_KEYS = ("key", *LOCATION_COLUMNS)


class CacheError(RaytunerError, RuntimeError):
    """A cache that cannot be used as it is; the message names the folder and the fix."""


# ---- tensors as bytes ----------------------------------------------------------------------------


def tensor_fields(name: str, array: np.ndarray) -> dict[str, Any]:
    """``{name: bytes, name_shape: [...], name_dtype: "float32"}`` for one array."""
    contiguous = np.ascontiguousarray(array)
    little = contiguous.astype(contiguous.dtype.newbyteorder("<"), copy=False)
    return {
        name: little.tobytes(),
        f"{name}_shape": list(contiguous.shape),
        f"{name}_dtype": str(contiguous.dtype),
    }


def tensor_from_fields(row: Mapping[str, Any], name: str) -> np.ndarray:
    dtype = np.dtype(row[f"{name}_dtype"]).newbyteorder("<")
    return np.frombuffer(row[name], dtype=dtype).reshape([int(n) for n in row[f"{name}_shape"]])


def text_schema(tensor_names: Sequence[str]) -> pa.Schema:
    columns = dict(TEXT_COLUMNS)
    for name in tensor_names:
        columns.update(
            {name: pa.binary(), f"{name}_shape": pa.list_(pa.int32()), f"{name}_dtype": pa.string()}
        )
    return pa.schema(columns)


LATENT_SCHEMA = pa.schema(LATENT_COLUMNS)
MASK_COLUMNS: dict[str, pa.DataType] = {
    "loss_mask": pa.binary(),
    "loss_mask_shape": pa.list_(pa.int32()),
    "loss_mask_dtype": pa.string(),
}
MASKED_LATENT_SCHEMA = pa.schema({**LATENT_COLUMNS, **MASK_COLUMNS})


# ---- shards ----------------------------------------------------------------------------------------


def new_build_id() -> str:
    return time.strftime("%Y%m%d%H%M%S") + "-" + uuid.uuid4().hex[:8]


def write_shard(
    folder: Location, relative: str, table: pa.Table, *, encoder_key: str, kind: str
) -> tuple[str, int]:
    """Write ``table`` to ``folder/relative`` whole or not at all; returns (relative path, bytes)."""
    metadata = dict(table.schema.metadata or {})
    metadata.update({ENCODER_KEY_METADATA: encoder_key.encode(), KIND_METADATA: kind.encode()})
    table = table.replace_schema_metadata(metadata)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=ROW_GROUP_SIZE, compression="zstd")
    data = buffer.getvalue()
    filesystem, root = folder.resolve()
    try:
        write_bytes_atomic(filesystem, posixpath.join(root, relative), data)
    except (OSError, pa.ArrowException) as error:
        raise StorageError(describe_error(folder.child(relative).uri, error)) from None
    return relative, len(data)


def shard_locations(keys: Sequence[str], shard: str) -> list[dict[str, Any]]:
    """Index rows for a shard written with :data:`ROW_GROUP_SIZE` rows per group."""
    return [
        {"key": key, "shard": shard, "row_group": i // ROW_GROUP_SIZE, "row": i % ROW_GROUP_SIZE}
        for i, key in enumerate(keys)
    ]


def read_shard_metadata(folder: Location, relative: str) -> dict[bytes, bytes] | None:
    """The shard's key-value metadata, or None when the file is not a readable Parquet file."""
    filesystem, root = folder.resolve()
    try:
        with filesystem.open_input_file(posixpath.join(root, relative)) as handle:
            return dict(pq.ParquetFile(handle).schema_arrow.metadata or {})
    except (OSError, pa.ArrowException):
        return None


def read_shard_columns(folder: Location, relative: str, columns: Sequence[str]) -> pa.Table:
    filesystem, root = folder.resolve()
    with filesystem.open_input_file(posixpath.join(root, relative)) as handle:
        return pq.ParquetFile(handle).read(columns=list(columns))


# ---- manifest and index ------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Manifest:
    """What a cache folder holds: its kind, encoder identity and current index."""

    kind: str
    encoder: dict[str, Any]
    encoder_key: str
    index: str | None = None
    rows: int = 0
    shards: int = 0
    build: str | None = None
    updated: float = 0.0
    # Rows encoded into this folder over all its builds: a build that re-encodes nothing leaves it
    # as it was, which is how a sweep shows that no trial encoded anything.
    encoded: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return (
            json.dumps(
                {
                    "format": FORMAT_NAME,
                    "version": FORMAT_VERSION,
                    "kind": self.kind,
                    "encoder_key": self.encoder_key,
                    "encoder": self.encoder,
                    "index": self.index,
                    "rows": self.rows,
                    "shards": self.shards,
                    "build": self.build,
                    "updated": self.updated,
                    "encoded": self.encoded,
                    **({"extra": self.extra} if self.extra else {}),
                },
                indent=2,
                sort_keys=False,
            )
            + "\n"
        )


def read_manifest(folder: Location) -> Manifest | None:
    """The folder's manifest; None when there is none yet. A damaged one is a CacheError."""
    filesystem, root = folder.resolve()
    path = posixpath.join(root, MANIFEST_NAME)
    try:
        if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        raw = json.loads(read_bytes(filesystem, path).decode("utf-8"))
    except (OSError, pa.ArrowException) as error:
        raise StorageError(describe_error(folder.child(MANIFEST_NAME).uri, error)) from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CacheError(
            f"{folder.child(MANIFEST_NAME)}: not a raytuner cache manifest (unreadable JSON); "
            "move the folder aside or run `raytuner cache --rebuild`"
        ) from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise CacheError(f"{folder.child(MANIFEST_NAME)}: not a raytuner cache manifest")
    if raw.get("version") != FORMAT_VERSION:
        raise CacheError(
            f"{folder.child(MANIFEST_NAME)}: cache format version {raw.get('version')} "
            f"(this raytuner reads version {FORMAT_VERSION}); run `raytuner cache --rebuild` to re-encode it"
        )
    return Manifest(
        kind=raw["kind"],
        encoder=raw.get("encoder", {}),
        encoder_key=raw["encoder_key"],
        index=raw.get("index"),
        rows=int(raw.get("rows", 0)),
        shards=int(raw.get("shards", 0)),
        build=raw.get("build"),
        updated=float(raw.get("updated", 0.0)),
        encoded=int(raw.get("encoded", 0)),
        extra=raw.get("extra", {}),
    )


def commit(folder: Location, manifest: Manifest, index: pa.Table) -> None:
    """Write the new index, then the manifest that points at it (the commit), then drop old indexes."""
    filesystem, root = folder.resolve()
    previous = read_manifest(folder)
    manifest.index = f"index-{manifest.build}.parquet"
    manifest.rows = index.num_rows
    manifest.updated = time.time()
    buffer = io.BytesIO()
    pq.write_table(index, buffer, compression="zstd")
    try:
        write_bytes_atomic(filesystem, posixpath.join(root, manifest.index), buffer.getvalue())
        write_bytes_atomic(filesystem, posixpath.join(root, MANIFEST_NAME), manifest.to_json().encode())
        if previous is not None and previous.index and previous.index != manifest.index:
            filesystem.delete_file(posixpath.join(root, previous.index))
    except (OSError, pa.ArrowException) as error:
        raise StorageError(describe_error(folder.uri, error)) from None


def read_index(folder: Location, manifest: Manifest) -> pa.Table:
    if manifest.index is None:
        raise CacheError(f"{folder}: the manifest lists no index; run `raytuner cache` to finish the build")
    filesystem, root = folder.resolve()
    try:
        with filesystem.open_input_file(posixpath.join(root, manifest.index)) as handle:
            return pq.read_table(handle)
    except (OSError, pa.ArrowException) as error:
        raise CacheError(
            f"{describe_error(folder.child(manifest.index).uri, error)}; run `raytuner cache` to rebuild the index"
        ) from None


def index_table(rows: Iterable[Mapping[str, Any]], columns: Mapping[str, pa.DataType]) -> pa.Table:
    schema = pa.schema({**columns, **LOCATION_COLUMNS})
    materialised = list(rows)
    return pa.Table.from_pylist(materialised, schema=schema) if materialised else schema.empty_table()
