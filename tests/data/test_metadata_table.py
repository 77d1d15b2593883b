"""Captions from a dataset's metadata table (metadata_backend parquet), on local folders (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raytuner.config.datasets import DatasetConfig
from raytuner.config.parquet import ParquetSettings
from raytuner.data.discovery import DatasetError, list_dataset, merge_probes, probe_file
from tests.s3_server import S3Server


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 16), (20, 90, 200)).save(path, format="PNG")


def _dataset(folder: Path, settings: ParquetSettings) -> DatasetConfig:
    return DatasetConfig(
        id="images",
        type="local",
        instance_data_dir=folder,
        caption_strategy="parquet",
        metadata_backend="parquet",
        parquet=settings,
    )


def _captions(dataset: DatasetConfig) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    listing = list_dataset(dataset)
    probes = {
        listed.fingerprint: probe_file(listed, listing.location, caption_strategy=dataset.caption_strategy)
        for listed in listing.files
    }
    images, skipped = merge_probes(listing, probes)
    return {image.relative: image.captions for image in images}, {s.relative: s.reason for s in skipped}


def test_parquet_captions_name_images_by_relative_path_without_extension(tmp_path: Path) -> None:
    images = tmp_path / "images"
    for name in ("a.png", "sub/b.png", "c.png", "d.png"):
        _png(images / name)
    table = pa.table(
        {
            "id": ["a.jpg", "sub/b", "c", "unused"],
            "description": ["  a red square ", None, "", "x"],
            "tags": [["one", "two"], ["b tags"], [], []],
        }
    )
    pq.write_table(table, tmp_path / "captions.parquet")
    settings = ParquetSettings(path=str(tmp_path / "captions.parquet"), fallback_caption_column="tags")
    captions, skipped = _captions(_dataset(images, settings))
    # The table's extension is dropped as the image's is; an empty caption falls back to the tags.
    assert captions == {"a.png": ("a red square",), "sub/b.png": ("b tags",)}
    assert set(skipped) == {"c.png", "d.png"}
    assert "no caption for 'd' in captions.parquet (caption_strategy parquet)" in skipped["d.png"]


def test_a_csv_table_with_extensions_and_several_caption_columns(tmp_path: Path) -> None:
    images = tmp_path / "images"
    for name in ("a.png", "b.png"):
        _png(images / name)
    (tmp_path / "meta.csv").write_text(
        "file,short,long\na.png,a square,a small blue square\nb,only short,\n", encoding="utf-8"
    )
    settings = ParquetSettings(
        path=str(tmp_path / "meta.csv"),
        filename_column="file",
        caption_column=("short", "long"),
        identifier_includes_extension=True,
    )
    captions, skipped = _captions(_dataset(images, settings))
    assert captions == {"a.png": ("a square", "a small blue square")}
    assert "no caption for 'b.png'" in skipped["b.png"]


def test_a_missing_column_or_table_is_one_line(tmp_path: Path) -> None:
    images = tmp_path / "images"
    _png(images / "a.png")
    pq.write_table(pa.table({"id": ["a"], "text": ["x"]}), tmp_path / "captions.parquet")
    with pytest.raises(DatasetError) as caught:
        list_dataset(_dataset(images, ParquetSettings(path=str(tmp_path / "captions.parquet"))))
    assert "no column 'description' (columns: id, text)" in str(caught.value)
    assert "\n" not in str(caught.value)
    with pytest.raises(DatasetError, match=r"does not exist; fix parquet\.path"):
        list_dataset(_dataset(images, ParquetSettings(path=str(tmp_path / "missing.parquet"))))


def test_an_aws_dataset_reads_its_table_from_its_bucket(s3_server: S3Server, tmp_path: Path) -> None:
    bucket = s3_server.create_bucket("raytuner-parquet")
    filesystem = s3_server.filesystem()
    _png(tmp_path / "a.png")
    with filesystem.open_output_stream(f"{bucket}/shapes/a.png") as stream:
        stream.write((tmp_path / "a.png").read_bytes())
    pq.write_table(pa.table({"id": ["a"], "description": ["from the bucket"]}), tmp_path / "t.parquet")
    with filesystem.open_output_stream(f"{bucket}/meta/t.parquet") as stream:
        stream.write((tmp_path / "t.parquet").read_bytes())
    dataset = DatasetConfig(
        id="images",
        type="aws",
        aws_bucket_name=bucket,
        aws_data_prefix="shapes",
        aws_endpoint_url=s3_server.endpoint_url,
        aws_region_name=s3_server.region,
        aws_access_key_id=s3_server.access_key_id,
        aws_secret_access_key=s3_server.secret_access_key,
        caption_strategy="parquet",
        metadata_backend="parquet",
        parquet=ParquetSettings(path="meta/t.parquet"),
    )
    captions, skipped = _captions(dataset)
    assert captions == {"a.png": ("from the bucket",)} and not skipped
