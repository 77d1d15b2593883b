"""Pre-flight checks: what can be known wrong about a loaded run before any work starts."""

from __future__ import annotations

from pathlib import Path

from raytuner.config.datasets import DatasetConfig
from raytuner.config.paths import display, has_scheme
from raytuner.config.run import RunConfig


def check_run(run: RunConfig) -> list[str]:
    """Errors that can be found before any work: missing dataset folders and metadata tables.

    An existing but empty folder passes; the cache step reports too few images later.
    """
    errors: list[str] = []
    where = (
        display(run.sources["data_backend_config"]) if "data_backend_config" in run.sources else "datasets"
    )
    for dataset in run.enabled_datasets:
        if _missing_table(dataset):
            assert dataset.parquet is not None
            errors.append(
                f"{where}: dataset '{dataset.id}': 'parquet.path' = '{dataset.parquet.path}': no such file "
                "(caption_strategy parquet reads its captions there); fix the path"
            )
        if dataset.type != "local" or not dataset.needs_images or dataset.instance_data_dir is None:
            continue
        folder = dataset.instance_data_dir
        if not folder.exists():
            errors.append(
                f"{where}: dataset '{dataset.id}': 'instance_data_dir' = '{folder}': folder does not exist; "
                "create it and put the images there, or fix the path"
            )
        elif not folder.is_dir():
            errors.append(
                f"{where}: dataset '{dataset.id}': 'instance_data_dir' = '{folder}': expected a folder, found a file"
            )
    return errors


def _missing_table(dataset: DatasetConfig) -> bool:
    """A local dataset whose captions come from a metadata table that is not there."""
    table = dataset.parquet
    if table is None or dataset.caption_strategy != "parquet" or dataset.type != "local":
        return False
    return not has_scheme(table.path) and not Path(table.path).is_file()
