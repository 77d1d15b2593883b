"""What the cache build works on: each dataset's state, and its files as typed rows.

A :class:`LatentRow` is one file as the latent index lists it; a file this build found and placed
also carries its :class:`SourceFile` (where it is read from, its crop, its captions), which never
reaches the index. Ray Data hands stages dicts of columns: the rows become dicts only there
(:func:`latent_todo_row`), and typed again when a stage's results come back.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

import pyarrow as pa

from raytuner.config.datasets import DatasetConfig
from raytuner.data.buckets import BucketSettings, Placement
from raytuner.data.discovery import DiscoveredImage, DiscoveredMask, Listing, SkippedFile
from raytuner.storage import Location

# A latent index row, besides where its latent row is: ``key`` is the content key of the latent
# row, ``sample`` the file's key in the plan (identical files share a key, never a sample).
LATENT_INDEX_COLUMNS: dict[str, pa.DataType] = {
    "key": pa.string(),
    "sample": pa.string(),
    "dataset_id": pa.string(),
    "source": pa.string(),
    "caption_keys": pa.list_(pa.string()),
    "bucket": pa.string(),
    "width": pa.int32(),
    "height": pa.int32(),
}


@dataclass(frozen=True, kw_only=True)
class SourceFile:
    """A file this build found and placed: what encoding it needs, and the index never holds."""

    path: str
    placement: Placement
    captions: tuple[str, ...]
    original: tuple[int, int]  # width, height before resize and crop
    mask_path: str = ""  # the mask file cropped with it; "" without masked loss


@dataclass(frozen=True, kw_only=True)
class LatentRow:
    """One file of a dataset as its latent index lists it (:data:`LATENT_INDEX_COLUMNS`)."""

    key: str
    sample: str
    dataset_id: str
    source: str
    caption_keys: tuple[str, ...]
    bucket: str
    width: int
    height: int
    # None for a row taken from the committed index unread (skip_file_discovery): it is kept as
    # it is and never encoded.
    file: SourceFile | None = None

    @classmethod
    def committed(cls, row: dict[str, Any], *, sample: str) -> LatentRow:
        """A row of a committed latent index (written before samples had a column of their own or after)."""
        return cls(
            key=row["key"],
            sample=sample,
            dataset_id=row["dataset_id"],
            source=row["source"],
            caption_keys=tuple(row["caption_keys"]),
            bucket=row["bucket"],
            width=row["width"],
            height=row["height"],
        )

    def index_columns(self) -> dict[str, Any]:
        """The row's columns of the latent index, as Arrow takes them."""
        return {
            "key": self.key,
            "sample": self.sample,
            "dataset_id": self.dataset_id,
            "source": self.source,
            "caption_keys": list(self.caption_keys),
            "bucket": self.bucket,
            "width": self.width,
            "height": self.height,
        }


@dataclass(kw_only=True)
class DatasetWork:
    """One image or eval dataset: where it is read from and cached, and what the build found."""

    dataset: DatasetConfig
    settings: BucketSettings
    cache: Location
    listing: Listing | None = None
    images: list[DiscoveredImage] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    rows: dict[str, LatentRow] = field(default_factory=dict)  # sample key -> row
    existing: dict[str, dict[str, Any]] = field(default_factory=dict)  # content key -> location
    # Rows the training workers encode (raytuner.cache.ondemand): content key -> pending row location.
    pending: dict[str, dict[str, Any]] = field(default_factory=dict)
    stale_shards: set[str] = field(default_factory=set)
    written: dict[str, dict[str, Any]] = field(default_factory=dict)  # content key -> location
    bytes_by_bucket: Counter[str] = field(default_factory=Counter)
    encode_skipped: list[SkippedFile] = field(default_factory=list)
    vae_calls: set[str] = field(default_factory=set)
    encoded_before: int = 0  # the folder's lifetime count of encoded rows, from its manifest
    # Masked loss: the linked mask dataset, its files, and each image's mask (by relative path).
    mask: DatasetConfig | None = None
    mask_listing: Listing | None = None
    masks: dict[str, DiscoveredMask] = field(default_factory=dict)


class LatentTodo(TypedDict):
    """One image to read, crop and encode, as the Ray Data stages take it (``cache/stages.py``)."""

    key: str
    dataset_id: str
    path: str
    source: str
    bucket: str
    width: int
    height: int
    inter_w: int
    inter_h: int
    left: int
    top: int
    original_w: int
    original_h: int
    mask_dataset_id: str
    mask_path: str


def latent_todo_row(item: DatasetWork, row: LatentRow) -> LatentTodo:
    """What the read-and-crop task gets for one image to encode: file, bucket, crop, and mask file."""
    assert row.file is not None, "only a file this build placed is encoded"
    placement = row.file.placement
    return {
        "key": row.key,
        "dataset_id": item.dataset.id,
        "path": row.file.path,
        "source": row.source,
        "bucket": placement.label,
        "width": placement.bucket[0],
        "height": placement.bucket[1],
        "inter_w": placement.intermediary[0],
        "inter_h": placement.intermediary[1],
        "left": placement.left,
        "top": placement.top,
        "original_w": row.file.original[0],
        "original_h": row.file.original[1],
        # The mask is cropped with the image's placement, never one of its own.
        "mask_dataset_id": item.mask.id if item.mask is not None else "",
        "mask_path": row.file.mask_path,
    }


def latent_todo(work: Sequence[DatasetWork]) -> list[LatentTodo]:
    """The images to encode: each latent row a cache lacks once, however many identical files share it.

    One bucket after another, so that VAE batches and shards hold one image size.
    """
    todo: dict[tuple[str, str], LatentTodo] = {}
    for item in work:
        for row in item.rows.values():
            wanted = (item.dataset.id, row.key)
            if row.key in item.existing or row.file is None or wanted in todo:
                continue
            todo[wanted] = latent_todo_row(item, row)
    return sorted(todo.values(), key=lambda entry: (entry["dataset_id"], entry["bucket"], entry["key"]))
