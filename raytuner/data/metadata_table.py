"""Captions from a dataset's metadata table (``metadata_backend: parquet``, ``caption_strategy: parquet``).

As SimpleTuner's Parquet metadata backend reads it: each row names one image in
``filename_column`` by its path below the dataset's folder (or bucket prefix), without its
extension unless ``identifier_includes_extension``; its captions are the non-empty values of
``caption_column`` (one column, a list-valued column, or a list of columns), or else of
``fallback_caption_column``. An image the table gives no caption is skipped and reported. The
table is a Parquet file, or JSON Lines or CSV by its file name's ending; it is read once per
build, where listing runs.
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from raytuner.config.datasets import DatasetConfig
from raytuner.config.parquet import ParquetSettings
from raytuner.config.paths import has_scheme
from raytuner.errors import RaytunerError
from raytuner.storage import Location, S3Settings, describe_error, read_bytes


class MetadataTableError(RaytunerError, RuntimeError):
    """A metadata table that cannot be read, or lacks a column it is configured with."""


def table_location(dataset: DatasetConfig, s3: S3Settings | None) -> Location:
    """Where the table is: a local file (resolved by the loader), or a key in the dataset's bucket."""
    assert dataset.parquet is not None
    path = dataset.parquet.path
    if dataset.type == "aws" and not has_scheme(path):
        return Location(uri=f"s3://{dataset.aws_bucket_name}/{path.lstrip('/')}", s3=s3)
    return Location(uri=path, s3=s3 if has_scheme(path) else None)


def image_identifier(relative: str, settings: ParquetSettings) -> str:
    """How the table names the image at ``relative`` (a posix path below the dataset's root)."""
    return relative if settings.identifier_includes_extension else posixpath.splitext(relative)[0]


def read_caption_table(dataset: DatasetConfig, location: Location) -> dict[str, tuple[str, ...]]:
    """Identifier -> captions, for every row that has at least one caption."""
    settings = dataset.parquet
    assert settings is not None
    label = f"dataset '{dataset.id}': {location}"
    filesystem, path = location.resolve()
    try:
        data = read_bytes(filesystem, path)
    except FileNotFoundError:
        raise MetadataTableError(
            f"{label}: the metadata table (parquet.path) does not exist; fix parquet.path"
        ) from None
    except OSError as error:
        raise MetadataTableError(
            f"{label}: cannot read the metadata table: {describe_error(path, error)}"
        ) from None
    table = _parse(data, settings.table_format, label=label)
    wanted = [settings.filename_column, *settings.caption_column]
    if settings.fallback_caption_column:
        wanted.append(settings.fallback_caption_column)
    missing = [name for name in dict.fromkeys(wanted) if name not in table.column_names]
    if missing:
        raise MetadataTableError(
            f"{label}: no column {', '.join(repr(m) for m in missing)} (columns: {', '.join(table.column_names)}); "
            "set parquet.filename_column / caption_column / fallback_caption_column to the table's column names"
        )
    names = table.column(settings.filename_column).to_pylist()
    columns = [table.column(name).to_pylist() for name in settings.caption_column]
    fallback = (
        table.column(settings.fallback_caption_column).to_pylist()
        if settings.fallback_caption_column
        else None
    )
    captions: dict[str, tuple[str, ...]] = {}
    for row, name in enumerate(names):
        if name is None:
            continue
        found = _texts(column[row] for column in columns)
        if not found and fallback is not None:
            found = _texts([fallback[row]])
        if found:
            # The table names the image as written; extensions go unless they are part of the name.
            captions[image_identifier(str(name), settings)] = found
    return captions


def _parse(data: bytes, table_format: str, *, label: str) -> pa.Table:
    try:
        if table_format == "csv":
            return pacsv.read_csv(io.BytesIO(data))
        if table_format == "jsonl":
            return pajson.read_json(io.BytesIO(data))
        return pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError, ValueError) as error:
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MetadataTableError(f"{label}: not a readable {table_format} table ({text})") from None


def _texts(values: Iterable[Any]) -> tuple[str, ...]:
    """The non-empty, stripped captions in ``values``: strings, or lists of them."""
    found: list[str] = []
    for value in values:
        if value is None:
            continue
        if isinstance(value, list):
            found.extend(_texts(value))
            continue
        text = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
        if text.strip():
            found.append(text.strip())
    return tuple(found)
