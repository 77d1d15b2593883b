"""Finding a dataset's images and reading what the cache needs to know about each one.

Listing runs where the build is driven; *probing* (reading every file once: its SHA-256, its
size after EXIF rotation, a full decode to catch truncation, its caption file) runs in Ray
tasks on the cluster's nodes (:mod:`raytuner.cache.placing`), from the plain functions here.
Files that cannot be used (zero bytes, truncated, not an image, no caption) are skipped and
reported, never fatal. A node that cannot see a ``type: local`` dataset at all is fatal, with
a message saying to put the images on a shared filesystem or object storage.

Probe results are kept beside the cache (``raytuner_discovery.parquet``) keyed by path, size and
modification time of the image and of its caption file, so an unchanged file is read once.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import socket
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from raytuner.config.datasets import DatasetConfig
from raytuner.data import huggingface, sampling
from raytuner.data.captions import CaptionError, caption_file_for, caption_from_filename, caption_from_text
from raytuner.data.metadata_table import (
    MetadataTableError,
    image_identifier,
    read_caption_table,
    table_location,
)
from raytuner.errors import RaytunerError
from raytuner.storage import Location, S3Settings, StorageError, describe_error, list_files, read_bytes


class DatasetError(RaytunerError, RuntimeError):
    """A dataset that cannot be read at all: its folder cannot be listed, or this node cannot see it."""


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# Folders SimpleTuner skips while walking a dataset (OS and notebook bookkeeping).
IGNORED_FOLDERS = frozenset(
    {".Spotlight-V100", ".Trashes", ".fseventsd", ".TemporaryItems", ".zfs", ".ipynb_checkpoints"}
)
DISCOVERY_INDEX = "raytuner_discovery.parquet"
# Probe errors that say nothing about the file's content (it may be readable next time).
TRANSIENT_ERRORS = ("unreadable:", "file disappeared", "caption file unreadable")
# Skip reasons of files that are not a decodable image (what delete_problematic_images deletes).
UNDECODABLE = ("zero-byte file", "not an image", "corrupt or truncated image")


def dataset_location(dataset: DatasetConfig) -> Location:
    """Where a dataset's images are: its local folder, ``s3://bucket/prefix``, or a Hugging Face dataset's rows."""
    if dataset.type == "huggingface":
        rows = hub_rows(dataset)
        return Location(uri=str(rows), hub=rows)
    if dataset.type == "aws":
        prefix = dataset.aws_data_prefix.strip("/")
        uri = f"s3://{dataset.aws_bucket_name}" + (f"/{prefix}" if prefix else "")
        return Location(uri=uri, s3=s3_settings(dataset))
    assert dataset.instance_data_dir is not None
    return Location(uri=str(dataset.instance_data_dir))


def hub_rows(dataset: DatasetConfig) -> huggingface.HubRows:
    assert dataset.dataset_name is not None
    return huggingface.HubRows(
        dataset_id=dataset.id,
        name=dataset.dataset_name,
        split=dataset.split,
        revision=dataset.revision,
        image_column=dataset.image_column,
        caption_columns=dataset.caption_columns,
        fallback_caption_column=dataset.fallback_caption_column,
        description_column=dataset.description_column,
    )


def s3_settings(dataset: DatasetConfig) -> S3Settings:
    """The dataset's S3 settings; unset credentials come from the environment."""
    return S3Settings(
        endpoint_url=dataset.aws_endpoint_url,
        region=dataset.aws_region_name,
        access_key_id=dataset.aws_access_key_id,
        secret_access_key=dataset.aws_secret_access_key,
        session_token=dataset.aws_session_token,
    )


@dataclass(frozen=True, kw_only=True)
class ListedFile:
    """A file found by listing, before it is read."""

    dataset_id: str
    path: str  # inside the dataset's filesystem
    relative: str
    size: int
    mtime_ns: int
    caption_path: str | None = None
    caption_fingerprint: str = ""
    # caption_strategy parquet: the metadata table's captions, read when the dataset is listed.
    table_captions: tuple[str, ...] = ()

    @property
    def fingerprint(self) -> str:
        return f"{self.path}|{self.size}|{self.mtime_ns}|{self.caption_fingerprint}"


@dataclass(frozen=True, kw_only=True)
class Probe:
    """What reading one file found: an image's content hash, size and captions, or why it is skipped."""

    fingerprint: str
    sha256: str = ""
    width: int = 0
    height: int = 0
    captions: tuple[str, ...] = ()
    error: str = ""

    @property
    def transient(self) -> bool:
        """A failure of access, not of content: worth reading the file again next build."""
        return self.error.startswith(TRANSIENT_ERRORS)


@dataclass(frozen=True, kw_only=True)
class DiscoveredImage:
    dataset_id: str
    path: str
    relative: str
    size: int
    sha256: str
    width: int
    height: int
    captions: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class SkippedFile:
    dataset_id: str
    relative: str
    reason: str


@dataclass(kw_only=True)
class Listing:
    """One dataset's files: images to probe (with caption files found), and files skipped outright."""

    dataset: DatasetConfig
    location: Location
    files: list[ListedFile] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)


def _mtime_ns(info: Any) -> int:
    mtime = info.mtime_ns
    return int(mtime) if mtime is not None else 0


def list_dataset(dataset: DatasetConfig, *, captions: bool = True) -> Listing:
    """Every image below the dataset's root, recursively, with its caption file when one is needed.

    ``captions=False`` lists a mask dataset: its files are weights, never captioned.
    """
    location = dataset_location(dataset)
    listing = Listing(dataset=dataset, location=location)
    if location.hub is not None:
        return _limited(_list_rows(listing, location.hub, captions=captions))
    _, root = location.resolve()
    try:
        infos = list(list_files(location))
    except StorageError as error:
        raise DatasetError(f"dataset '{dataset.id}': cannot list {location}: {error}") from None
    by_path = {info.path: info for info in infos}
    table: dict[str, tuple[str, ...]] | None = None
    if captions and dataset.caption_strategy == "parquet":
        where = table_location(dataset, location.s3)
        try:
            table = read_caption_table(dataset, where)
        except MetadataTableError as error:
            raise DatasetError(str(error)) from None
    for info in sorted(infos, key=lambda item: item.path):
        relative = posixpath.relpath(info.path, root) if root else info.path
        parts = relative.split("/")
        if any(part in IGNORED_FOLDERS for part in parts[:-1]):
            continue
        if not parts[-1].lower().endswith(IMAGE_EXTENSIONS) or parts[-1].startswith("."):
            continue
        if info.size == 0:
            listing.skipped.append(
                SkippedFile(dataset_id=dataset.id, relative=relative, reason="zero-byte file")
            )
            continue
        caption_path, caption_fp = None, ""
        if captions and dataset.caption_strategy == "textfile":
            caption_path = caption_file_for(info.path)
            caption_info = by_path.get(caption_path)
            if caption_info is None:
                listing.skipped.append(
                    SkippedFile(
                        dataset_id=dataset.id,
                        relative=relative,
                        reason=f"no caption file {posixpath.basename(caption_path)} (caption_strategy textfile)",
                    )
                )
                continue
            caption_fp = f"{caption_info.size}|{_mtime_ns(caption_info)}"
        table_captions: tuple[str, ...] = ()
        if table is not None:
            assert dataset.parquet is not None
            table_captions = table.get(image_identifier(relative, dataset.parquet), ())
            if not table_captions:
                listing.skipped.append(
                    SkippedFile(
                        dataset_id=dataset.id,
                        relative=relative,
                        reason=f"no caption for {image_identifier(relative, dataset.parquet)!r} in "
                        f"{posixpath.basename(dataset.parquet.path)} (caption_strategy parquet)",
                    )
                )
                continue
        listing.files.append(
            ListedFile(
                dataset_id=dataset.id,
                path=info.path,
                relative=relative,
                size=int(info.size),
                mtime_ns=_mtime_ns(info),
                caption_path=caption_path,
                caption_fingerprint=caption_fp,
                table_captions=table_captions,
            )
        )
    return _limited(listing)


def _limited(listing: Listing) -> Listing:
    """The listing with only the files ``max_num_samples`` keeps (images and their skips alike)."""
    relatives = [listed.relative for listed in listing.files] + [skip.relative for skip in listing.skipped]
    kept = sampling.chosen_files(
        relatives, dataset_id=listing.dataset.id, limit=listing.dataset.max_num_samples
    )
    listing.files = [listed for listed in listing.files if listed.relative in kept]
    listing.skipped = [skip for skip in listing.skipped if skip.relative in kept]
    return listing


def _list_rows(listing: Listing, rows: huggingface.HubRows, *, captions: bool) -> Listing:
    """Every row of a Hugging Face split, addressed by index (``split/index`` in reports).

    A row's fingerprint holds the split's fingerprint, the image column and, when the probe reads
    captions from the rows, the caption columns: a changed dataset or another column reads every
    row again, and two datasets reading one split differently never share a probe.
    """
    try:
        count = huggingface.row_count(rows)
        parts = [huggingface.fingerprint(rows), rows.split, rows.image_column]
    except huggingface.HubDatasetError as error:
        raise DatasetError(str(error)) from None
    if captions and listing.dataset.caption_strategy == "huggingface":
        parts += [*rows.caption_columns, str(rows.fallback_caption_column), rows.description_column]
    identity = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]
    listing.files = [
        ListedFile(
            dataset_id=rows.dataset_id,
            path=str(index),
            relative=f"{rows.split}/{index}",
            size=0,
            mtime_ns=0,
            caption_fingerprint=identity,
        )
        for index in range(count)
    ]
    return listing


def read_source(location: Location, path: str) -> bytes:
    """One image's bytes: a file, or the row ``path`` (its index) of a Hugging Face dataset."""
    if location.hub is None:
        filesystem, _ = location.resolve()
        return read_bytes(filesystem, path)
    try:
        return huggingface.image_bytes(location.hub, int(path))
    except huggingface.HubDatasetError as error:
        raise DatasetError(str(error)) from None


def node_cannot_see(dataset_id: str, location: Location) -> str:
    host = socket.gethostname()
    return (
        f"dataset '{dataset_id}': node {host} cannot read {location}; on a cluster every node must see the images: "
        "put them on a shared filesystem mounted at the same path on every node, or in object storage (type aws)"
    )


def check_visible(dataset_id: str, location: Location) -> None:
    """Raise the clear error when this node cannot see a local dataset's folder."""
    if location.is_local and not os.path.isdir(location.resolve()[1]):
        raise DatasetError(node_cannot_see(dataset_id, location))


def probe_file(listed: ListedFile, location: Location, *, caption_strategy: str) -> Probe:
    """Read one file: hash, decoded size (EXIF-rotated), full decode, captions. Errors become ``Probe.error``."""
    try:
        data = read_source(location, listed.path)
    except FileNotFoundError:
        check_visible(listed.dataset_id, location)
        return Probe(fingerprint=listed.fingerprint, error="file disappeared while the cache was built")
    except OSError as error:
        return Probe(
            fingerprint=listed.fingerprint, error=f"unreadable: {describe_error(listed.relative, error)}"
        )
    if not data:
        return Probe(fingerprint=listed.fingerprint, error="zero-byte file")
    try:
        width, height = decoded_size(data)
    except ImageDecodeError as error:
        return Probe(fingerprint=listed.fingerprint, error=str(error))
    captions: tuple[str, ...] = ()
    # Other strategies depend on the config, not the files: they are applied when probes are merged.
    try:
        if caption_strategy == "textfile":
            captions = read_caption_file(listed, location.resolve()[0])
        elif caption_strategy == "huggingface" and location.hub is not None:
            captions = row_captions(location.hub, int(listed.path))
    except CaptionError as error:
        return Probe(fingerprint=listed.fingerprint, error=str(error))
    return Probe(
        fingerprint=listed.fingerprint,
        sha256=hashlib.sha256(data).hexdigest(),
        width=width,
        height=height,
        captions=captions,
    )


class ImageDecodeError(RaytunerError, ValueError):
    """A file that is not a whole, decodable image."""


def open_image(data: bytes) -> Image.Image:
    """Decode fully, EXIF-rotated, as RGB (what SimpleTuner's ``correct_image`` does)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
        return ImageOps.exif_transpose(image).convert("RGB")
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (no image format recognised)") from None
    except (
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombWarning,
        Image.DecompressionBombError,
    ) as error:
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ImageDecodeError(f"corrupt or truncated image ({text})") from None


def decoded_size(data: bytes) -> tuple[int, int]:
    image = open_image(data)
    return image.size


def read_caption_file(listed: ListedFile, filesystem: Any) -> tuple[str, ...]:
    assert listed.caption_path is not None
    name = posixpath.basename(listed.caption_path)
    try:
        data = read_bytes(filesystem, listed.caption_path)
    except OSError as error:
        raise CaptionError(f"caption file unreadable: {describe_error(name, error)}") from None
    return caption_from_text(data, where=name)


def row_captions(rows: huggingface.HubRows, index: int) -> tuple[str, ...]:
    captions = huggingface.row_captions(rows, index)
    if not captions:
        columns = ", ".join(
            rows.caption_columns + ((rows.fallback_caption_column,) if rows.fallback_caption_column else ())
        )
        raise CaptionError(
            f"no caption in column(s) {columns} or {rows.description_column} (caption_strategy huggingface)"
        )
    return captions


def captions_for(listed: ListedFile, probe: Probe, dataset: DatasetConfig) -> tuple[str, ...]:
    """The captions of a probed image under the dataset's caption_strategy."""
    if dataset.caption_strategy == "instanceprompt":
        assert dataset.instance_prompt is not None
        return (dataset.instance_prompt.strip(),)
    if dataset.caption_strategy == "filename":
        caption = caption_from_filename(listed.path)
        if not caption:
            raise CaptionError("the file name gives an empty caption (caption_strategy filename)")
        return (caption,)
    if dataset.caption_strategy == "parquet":
        return listed.table_captions
    return probe.captions


def merge_probes(
    listing: Listing, probes: Mapping[str, Probe]
) -> tuple[list[DiscoveredImage], list[SkippedFile]]:
    """Listed files joined with their probes: usable images, and the files skipped."""
    images: list[DiscoveredImage] = []
    skipped = list(listing.skipped)
    for listed in listing.files:
        probe = probes[listed.fingerprint]
        try:
            if probe.error:
                raise CaptionError(probe.error)
            captions = captions_for(listed, probe, listing.dataset)
        except CaptionError as error:
            skipped.append(
                SkippedFile(dataset_id=listed.dataset_id, relative=listed.relative, reason=str(error))
            )
            continue
        images.append(
            DiscoveredImage(
                dataset_id=listed.dataset_id,
                path=listed.path,
                relative=listed.relative,
                size=listed.size,
                sha256=probe.sha256,
                width=probe.width,
                height=probe.height,
                captions=captions,
            )
        )
    return images, skipped


@dataclass(frozen=True, kw_only=True)
class DiscoveredMask:
    """The mask file of one image: same relative path, in the mask dataset."""

    path: str
    relative: str
    sha256: str
    width: int
    height: int


def pair_masks(
    images: Iterable[DiscoveredImage], listing: Listing, probes: Mapping[str, Probe]
) -> tuple[dict[str, DiscoveredMask], list[str]]:
    """Each image's mask (image relative path -> mask), and ``"file (why)"`` for images without one.

    A mask pairs with the image of the same relative path, extension included, as SimpleTuner
    pairs conditioning files. Masks without an image are ignored, as there.
    """
    by_relative = {listed.relative: listed for listed in listing.files}
    unlisted = {skipped.relative: skipped.reason for skipped in listing.skipped}
    masks: dict[str, DiscoveredMask] = {}
    missing: list[str] = []
    for image in images:
        listed = by_relative.get(image.relative)
        if listed is None:
            reason = unlisted.get(image.relative, "no mask file")
            missing.append(f"{image.relative} ({reason})")
            continue
        probe = probes[listed.fingerprint]
        if probe.error:
            missing.append(f"{image.relative} (mask: {probe.error})")
            continue
        masks[image.relative] = DiscoveredMask(
            path=listed.path,
            relative=listed.relative,
            sha256=probe.sha256,
            width=probe.width,
            height=probe.height,
        )
    return masks, missing


def probe_rows(probes: Iterable[Probe]) -> list[dict[str, Any]]:
    return [
        {
            "fingerprint": p.fingerprint,
            "sha256": p.sha256,
            "width": p.width,
            "height": p.height,
            "captions": list(p.captions),
            "error": p.error,
        }
        for p in probes
    ]


def probes_from_rows(rows: Iterable[Mapping[str, Any]]) -> dict[str, Probe]:
    return {
        row["fingerprint"]: Probe(
            fingerprint=row["fingerprint"],
            sha256=row["sha256"],
            width=int(row["width"]),
            height=int(row["height"]),
            captions=tuple(row["captions"] or ()),
            error=row["error"] or "",
        )
        for row in rows
    }
