"""``raytuner cache --config config.json``: build or update the caches, print the summary."""

from __future__ import annotations

import logging
import sys

from raytuner.cache.build import BuildOptions, CacheSummary, build_cache, check_cache_settings
from raytuner.cache.format import CacheError
from raytuner.config import ConfigError, RunConfig, check_run, load_config
from raytuner.data.plan import PlanError
from raytuner.ray_runtime import ray_session, unwrap_error
from raytuner.storage import StorageError

logger = logging.getLogger(__name__)

EXPECTED_ERRORS = (ConfigError, CacheError, StorageError, PlanError)


def run_cache(run: RunConfig, options: BuildOptions) -> CacheSummary:
    """Build the caches of a loaded run, on the connected Ray (or a local one); Ray errors unwrapped."""
    import ray

    problems = check_run(run)
    if problems:
        raise ConfigError(problems)
    check_cache_settings(run)
    with ray_session():
        try:
            return build_cache(run, options)
        except ray.exceptions.RayError as error:
            inner = unwrap_error(error, EXPECTED_ERRORS)
            if inner is not None:
                raise inner from None
            raise


def cache_main(
    config: str, *, strict: bool = False, rebuild: bool = False, encoder_actors: int | None = None
) -> int:
    try:
        run = load_config(config, strict=strict)
        summary = run_cache(run, BuildOptions(encoder_actors=encoder_actors, rebuild=rebuild))
    except EXPECTED_ERRORS as error:
        lines = error.problems if isinstance(error, ConfigError) else (str(error),)
        for line in lines:
            print(f"error: {line}", file=sys.stderr)
        return 2
    print()
    print(summary.table())
    return 0
