"""Reading a ``type: huggingface`` dataset: its rows, each row's image bytes and captions.

A :class:`HubRows` names the dataset (a Hub id, or a folder written by ``datasets``'
``save_to_disk`` or holding data files ``load_dataset`` reads), its split and revision and the
columns to read. It is small and plain, so Ray tasks on every node receive it and open the same
rows there: each process opens the dataset once (the Hub's files are downloaded into that node's
``datasets`` cache), and a row is addressed by its index in the split.

A row's identity for the discovery index is the split's fingerprint (``datasets`` derives it
from the data files, so a new revision or rewritten folder reads every row again) plus the index;
the latent cache itself is keyed by the SHA-256 of the image bytes, as for files.
"""

from __future__ import annotations

import functools
import io
import os
from pathlib import Path
from typing import Any

from raytuner.errors import RaytunerError
from raytuner.storage import HubRows

__all__ = [
    "HubDatasetError",
    "HubRows",
    "fingerprint",
    "image_bytes",
    "open_rows",
    "row_captions",
    "row_count",
]


class HubDatasetError(RaytunerError, RuntimeError):
    """A Hugging Face dataset that cannot be opened, or lacks the column it is read by."""


def is_local_name(name: str) -> bool:
    """A dataset name that is a folder on this machine rather than a Hub id."""
    return os.path.isabs(os.path.expanduser(name))


def open_rows(rows: HubRows) -> Any:
    """The split as a ``datasets.Dataset`` whose image column yields bytes (no decode).

    Opened once per process and folder state: Ray reuses worker processes across builds, and a
    folder rewritten with ``save_to_disk`` in between must be read anew there too.
    """
    return _open_rows(rows, _folder_stamp(rows))


def _folder_stamp(rows: HubRows) -> tuple[int, ...]:
    if not is_local_name(rows.name):
        return ()
    folder = Path(rows.name).expanduser()
    return tuple(
        (folder / name).stat().st_mtime_ns if (folder / name).is_file() else 0
        for name in ("state.json", "dataset_dict.json", f"{rows.split}/state.json")
    )


@functools.lru_cache(maxsize=8)
def _open_rows(rows: HubRows, stamp: tuple[int, ...]) -> Any:
    import datasets

    try:
        split = _load_split(rows)
    except HubDatasetError:
        raise
    except (
        OSError,
        ValueError,
        KeyError,
        datasets.exceptions.DatasetNotFoundError,
    ) as error:
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise HubDatasetError(
            f"dataset '{rows.dataset_id}': cannot open {rows}: {text}; check dataset_name, split and revision "
            "(a Hub id needs network access or the datasets cache; a folder must exist on every node)"
        ) from None
    columns = list(split.column_names)
    if rows.image_column not in columns:
        raise HubDatasetError(
            f"dataset '{rows.dataset_id}': 'image_column' = '{rows.image_column}': {rows} has no such column "
            f"(columns: {', '.join(columns)}); set image_column to the column holding the images"
        )
    feature = split.features[rows.image_column]
    if isinstance(feature, datasets.Image):
        # Bytes, not PIL images: the probe hashes them and the cache decodes them its own way.
        split = split.cast_column(rows.image_column, datasets.Image(decode=False))
    return split


def _load_split(rows: HubRows) -> Any:
    import datasets

    if is_local_name(rows.name):
        folder = Path(rows.name).expanduser()
        if not folder.is_dir():
            raise HubDatasetError(
                f"dataset '{rows.dataset_id}': node cannot read folder {folder} (dataset_name); on a cluster "
                "every node must see it: put it on a shared filesystem, or name a Hub dataset"
            )
        if (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file():
            saved = datasets.load_from_disk(str(folder))
            if isinstance(saved, datasets.DatasetDict):
                if rows.split not in saved:
                    raise HubDatasetError(
                        f"dataset '{rows.dataset_id}': 'split' = '{rows.split}': {folder} has splits "
                        f"{', '.join(saved)}; set split to one of them"
                    )
                return saved[rows.split]
            if rows.split != "train":
                # One saved split has no name to choose by; reading it for another name would ignore split.
                raise HubDatasetError(
                    f"dataset '{rows.dataset_id}': 'split' = '{rows.split}': {folder} holds a single split "
                    "(saved from a Dataset, not a DatasetDict); remove split, or save a DatasetDict"
                )
            return saved
    return datasets.load_dataset(rows.name, split=rows.split, revision=rows.revision)


def row_count(rows: HubRows) -> int:
    return len(open_rows(rows))


def fingerprint(rows: HubRows) -> str:
    """Changes when the split's data changes; ``datasets`` keeps it on every dataset it opens."""
    return str(getattr(open_rows(rows), "_fingerprint", "")) or str(rows)


def image_bytes(rows: HubRows, index: int) -> bytes:
    """The encoded image of row ``index``: the bytes stored in the dataset, or the file it points at."""
    value = open_rows(rows)[index][rows.image_column]
    if isinstance(value, bytes):
        return value
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            with open(value["path"], "rb") as stream:
                return stream.read()
    if hasattr(value, "save"):  # a PIL image in a column that is not an Image feature
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    raise OSError(f"row {index}: column '{rows.image_column}' holds no image ({type(value).__name__})")


def row_captions(rows: HubRows, index: int) -> tuple[str, ...]:
    """Row ``index``'s captions, in SimpleTuner's order: the caption columns, else the fallback
    column, else the description column (a mapping gives its main_subject, description and text).

    Dotted names read nested values (``metadata.caption``); a list of columns gives several
    captions, one drawn per step as for a multi-line caption file.
    """
    row = open_rows(rows)[index]
    captions = [text for column in rows.caption_columns for text in _texts(_nested(row, column))]
    if not captions and rows.fallback_caption_column:
        captions = _texts(_nested(row, rows.fallback_caption_column))
    if not captions:
        description = row.get(rows.description_column)
        if isinstance(description, dict):
            parts = [
                str(description[key])
                for key in ("main_subject", "description", "text")
                if description.get(key)
            ]
            captions = _texts(" ".join(parts))
        else:
            captions = _texts(description)
    return tuple(captions)


def _nested(row: dict[str, Any], column: str) -> Any:
    value: Any = row
    for part in column.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _texts(value: Any) -> list[str]:
    if value is None:
        return []
    values = value if isinstance(value, list | tuple) else [value]
    return [text for text in (str(item).strip() for item in values if item is not None) if text]
