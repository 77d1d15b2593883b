"""``raytuner cache --config config.json``: build or update the caches, print the summary."""

from __future__ import annotations

import logging

from raytuner.cache.build import (
    BuildOptions,
    CacheSummary,
    Encoders,
    build_cache,
    cache_encoders,
    check_cache_settings,
)
from raytuner.config import ConfigError, RunConfig, load_config
from raytuner.data.plan import BatchShape
from raytuner.data.reader import open_training_data
from raytuner.errors import find_error
from raytuner.ray_runtime import original_map_errors, ray_session

logger = logging.getLogger(__name__)


def run_cache(run: RunConfig, options: BuildOptions, encoders: Encoders | None = None) -> CacheSummary:
    """Build the caches of a loaded run, on the connected Ray (or a local one); Ray errors unwrapped.

    ``encoders`` is :func:`~raytuner.cache.build.check_cache_settings`' result when the caller
    has it already.
    """
    import ray

    if encoders is None:
        encoders = check_cache_settings(run)
    with ray_session(), original_map_errors():
        try:
            return build_cache(run, options, encoders)
        except ray.exceptions.RayError as error:
            inner = find_error(error)  # a RaytunerError of an encoding task, as it raised it
            if inner is not None:
                raise inner from None
            raise


def check_batches(run: RunConfig, *, workers: int | None = None) -> int:
    """Plan epoch 0 from the committed caches: every training dataset fills a global batch.

    The global batch is SimpleTuner's: ``train_batch_size`` x workers x
    ``gradient_accumulation_steps``, with ``workers`` as given, else ``ray_num_workers``, else
    ``num_processes``, else 1 (``raytuner cache`` alone does not know how many GPUs a run will use).
    Raises PlanError ("no images detected in dataset ...").
    Returns the number of global batches per epoch.
    """
    training = run.training
    shape = BatchShape(
        per_worker=training.train_batch_size,
        workers=workers or training.ray_num_workers or training.num_processes or 1,
        accumulation=training.gradient_accumulation_steps,
    )
    return len(open_training_data(run).plan(shape, seed=run.seed, epoch=0))


def cache_main(
    config: str, *, strict: bool = False, rebuild: bool = False, encoder_actors: int | None = None
) -> int:
    """The ``raytuner cache`` command: exit 0 with the caches committed and the summary printed.

    What stops it is raised as a RaytunerError, which the command line prints (raytuner/cli.py).
    """
    from raytuner.preflight import preflight
    from raytuner.ray_runtime import cluster_connection
    from raytuner.train.settings import read_settings

    run = load_config(config, strict=strict)
    request = read_settings(run)
    with cluster_connection():  # the run's workers, as train would choose them, for its checks
        problems = preflight(run, request.settle(), command="cache")
        if problems:
            raise ConfigError(problems)
        options = BuildOptions(encoder_actors=encoder_actors, rebuild=rebuild)
        summary = run_cache(run, options, cache_encoders(run))
    print()
    print(summary.table())
    # A PlanError here leaves the cache committed and kept: only the datasets are too small to
    # train on as configured.
    batches = check_batches(run)
    print(f"{batches} global batch(es) per epoch")
    return 0
