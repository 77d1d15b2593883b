"""``metadata_backend: parquet`` dataset entries: the ``parquet`` block as the loader reads it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from raytuner.config import check_run, load_config
from raytuner.config.errors import ConfigError
from raytuner.config.parquet import ParquetSettings
from tests.config.helpers import BASE_DATASETS, WriteRun


def _parquet_images(**block: Any) -> dict[str, Any]:
    return {
        "id": "images",
        "type": "local",
        "instance_data_dir": "images",
        "metadata_backend": "parquet",
        "caption_strategy": "parquet",
        "parquet": {"path": "{id}.parquet", **block},
    }


def test_a_parquet_dataset_entry_is_loaded(write_run: WriteRun, tmp_path: Path) -> None:
    datasets = [
        _parquet_images(
            filename_column="file", caption_column=["a", "b"], identifier_includes_extension=True
        ),
        BASE_DATASETS[1],
    ]
    run = load_config(write_run(datasets=datasets))
    images = run.datasets[0]
    assert images.caption_strategy == "parquet" and images.metadata_backend == "parquet"
    # The path is filled ({id}) and resolved from the working directory, as SimpleTuner opens it.
    assert images.parquet == ParquetSettings(
        path=str(tmp_path.resolve() / "images.parquet"),
        filename_column="file",
        caption_column=("a", "b"),
        identifier_includes_extension=True,
    )
    assert not [w for w in run.warnings if "parquet" in w]


def test_simpletuners_column_defaults_and_an_aws_key_kept_as_written(write_run: WriteRun) -> None:
    aws = {
        **_parquet_images(path="meta/captions.parquet"),
        "type": "aws",
        "aws_bucket_name": "bucket",
        "cache_dir_vae": "cache/vae",
    }
    del aws["instance_data_dir"]
    run = load_config(write_run(datasets=[aws, BASE_DATASETS[1]]))
    assert run.datasets[0].parquet == ParquetSettings(path="meta/captions.parquet")


def test_a_bad_parquet_block_is_refused_by_key(write_run: WriteRun) -> None:
    datasets = [_parquet_images(caption_column=3, identifier_includes_extension="yes"), BASE_DATASETS[1]]
    with pytest.raises(ConfigError) as caught:
        load_config(write_run(datasets=datasets))
    problems = "\n".join(caught.value.problems)
    assert "'parquet.caption_column' = 3: expected a column name or a list of column names" in problems
    assert "'parquet.identifier_includes_extension' = 'yes': expected true or false" in problems
    assert "needs a 'parquet' block" not in problems


def test_metadata_backend_parquet_needs_its_block(write_run: WriteRun) -> None:
    entry = _parquet_images()
    del entry["parquet"]
    with pytest.raises(ConfigError, match="metadata_backend parquet needs a 'parquet' block"):
        load_config(write_run(datasets=[entry, BASE_DATASETS[1]]))


def test_preflight_names_a_missing_local_table(write_run: WriteRun, tmp_path: Path) -> None:
    run = load_config(write_run(datasets=[_parquet_images(), BASE_DATASETS[1]]))
    assert check_run(run) == [
        f"multidatabackend.json: dataset 'images': 'parquet.path' = '{tmp_path.resolve() / 'images.parquet'}': "
        "no such file (caption_strategy parquet reads its captions there); fix the path"
    ]
    (tmp_path / "images.parquet").write_bytes(b"")
    assert check_run(run) == []
