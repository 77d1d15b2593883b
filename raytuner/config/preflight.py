"""Pre-flight checks: what can be known wrong about a loaded run before any work starts."""

from __future__ import annotations

from raytuner.config.paths import display
from raytuner.config.run import RunConfig


def check_run(run: RunConfig) -> list[str]:
    """Errors that can be found before any work: missing dataset folders.

    An existing but empty folder passes; the cache step reports too few images later.
    """
    errors: list[str] = []
    where = (
        display(run.sources["data_backend_config"]) if "data_backend_config" in run.sources else "datasets"
    )
    for dataset in run.enabled_datasets:
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
