"""``raytuner tune``: a hyperparameter sweep of LoKr training runs with Ray Tune, Optuna and ASHA.

The order is the one ``raytuner train`` keeps: everything about the files is checked before Ray
starts (the sweep file, every range's bounds as a trial would load them, the training settings
and the cache inputs); then the one cache every trial shares is built; then Ray Tune runs the
trials — Optuna's TPE sampler proposing points (the base config first), ASHA stopping the trials
that fall behind on ``eval_loss`` — and the results are written. The sweep is pinned to a stable
folder under ``ray_storage_path``, so running the same command again after an interruption
resumes it; a sweep file or base config changed since is refused rather than mixed in.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raytuner.batches.reader import check_batches
from raytuner.cache.build import BuildOptions, run_cache
from raytuner.cache.settings import cache_encoders
from raytuner.config import ConfigError, load_config, record_seed
from raytuner.config.paths import display
from raytuner.errors import RaytunerError
from raytuner.ray_runtime import cluster_connection, ray_session
from raytuner.train.launcher import (
    place_on_cluster,
    total_steps,
)
from raytuner.train.layout import on_cluster, pin_local_paths
from raytuner.train.preflight import preflight, training_problems
from raytuner.train.settings import RaySettings, read_settings, storage_filesystem
from raytuner.tune import results as sweep_results
from raytuner.tune.early_stopping import stopped_trials
from raytuner.tune.sweep import Sweep, read_sweep
from raytuner.tune.trial import TRIALS_FOLDER, TrialPlan, run_trial

logger = logging.getLogger(__name__)

RECORD_FILE = "sweep_record.json"
SCHEDULER_STATE_FILE = "sweep_scheduler_state.pkl"
EXIT_INTERRUPTED = 130
# The Tune function of a trial holds one CPU while its Ray Train workers run.
TRIAL_DRIVER_CPUS = 1.0


class SweepError(RaytunerError, RuntimeError):
    """A one-line reason the sweep cannot start or produced nothing usable."""


@dataclass(frozen=True, kw_only=True)
class SweepOutcome:
    outcomes: list[sweep_results.TrialOutcome]
    best: sweep_results.TrialOutcome | None
    interrupted: bool
    output_dir: Path
    table: str


def trial_resources(settings: RaySettings) -> dict[str, float]:
    """What one trial holds at once: its Tune function's CPU and all of its Train workers."""
    resources = {"CPU": TRIAL_DRIVER_CPUS + settings.num_workers * settings.cpus_per_worker}
    if settings.use_gpu:
        resources["GPU"] = settings.num_workers * settings.gpus_per_worker
    return resources


def trials_that_fit(cluster: dict[str, float], per_trial: dict[str, float]) -> int:
    """How many trials the cluster's resources hold at once, all their workers included."""
    counts = [
        math.floor(cluster.get(name, 0.0) / amount + 1e-9) for name, amount in per_trial.items() if amount > 0
    ]
    return max(0, min(counts, default=1))


def concurrency(sweep: Sweep, settings: RaySettings, cluster: dict[str, float]) -> int:
    """``max_concurrent_trials``: the sweep's, else as many trials as fit now (at least one)."""
    per_trial = trial_resources(settings)
    fits = trials_that_fit(cluster, per_trial)
    shown = ", ".join(f"{name} {amount:g}" for name, amount in per_trial.items())
    if fits == 0:
        logger.warning(
            "one trial needs {%s} but the cluster has {%s} now: trials wait until an autoscaler adds nodes",
            shown,
            ", ".join(f"{name} {cluster.get(name, 0):g}" for name in per_trial),
        )
    if sweep.max_concurrent_trials is not None:
        if sweep.max_concurrent_trials > max(fits, 1):
            logger.warning(
                "max_concurrent_trials %d, but only %d trial(s) of {%s} fit on the cluster now: the rest wait "
                "for resources (an autoscaling cluster adds nodes for them)",
                sweep.max_concurrent_trials,
                fits,
                shown,
            )
        return sweep.max_concurrent_trials
    return max(1, min(fits, sweep.num_samples))


def _check_before_ray(sweep: Sweep, settings: RaySettings) -> list[str]:
    """The base run's pre-flight check, and the training settings of every range's bounds."""
    problems = preflight(sweep.base, settings, command="tune")
    for parameter in sweep.parameters:
        for corner in parameter.corners():
            where = f"{display(sweep.path)}: parameters '{parameter.key}' = {corner!r}"
            run = sweep.trial_run({parameter.key: corner}, where=where)
            problems.extend(
                f"{where}: {line}" for line in training_problems(run, settings) if line not in problems
            )
    return problems


def _check_record(sweep: Sweep, output_dir: Path) -> bool:
    """True when ``output_dir`` holds this same sweep already (to resume); refuses a different one."""
    record = output_dir / RECORD_FILE
    fingerprint = sweep.fingerprint()
    if record.is_file():
        try:
            saved = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            saved = {}
        if saved.get("fingerprint") != fingerprint:
            raise SweepError(
                f"{display(output_dir)} holds sweep '{saved.get('name', '?')}' run with another sweep file or base "
                f"config ({display(record)}): run that sweep unchanged to resume it, or set another output_dir "
                "(nothing was deleted)"
            )
        return True
    output_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(
        json.dumps({"name": sweep.name, "fingerprint": fingerprint, "sweep": sweep.raw}, indent=2) + "\n",
        encoding="utf-8",
    )
    return False


def build_tuner(plan: TrialPlan, *, max_steps: int, max_concurrent: int, output_dir: Path) -> Any:
    """A new Tuner, or the interrupted one restored from the sweep's folder under the storage path."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from raytuner.tune.early_stopping import ResumableASHA

    sweep, settings = plan.sweep, plan.settings
    trainable = tune.with_parameters(run_trial, plan=plan)
    filesystem, storage_path = storage_filesystem(settings)
    experiment = f"{storage_path}/{sweep.name}"
    if tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
        logger.info("resuming sweep %s from %s", sweep.name, experiment)
        return tune.Tuner.restore(
            experiment, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=filesystem
        )
    scheduler_state = output_dir / SCHEDULER_STATE_FILE
    scheduler_state.unlink(missing_ok=True)  # left by a sweep stopped before Tune saved anything
    scheduler = None
    if sweep.early_stopping is not None:
        scheduler = ResumableASHA(
            state_file=scheduler_state,
            time_attr="step",
            metric=sweep.metric,
            mode="min",
            max_t=max_steps,
            grace_period=sweep.early_stopping.grace_for(
                max_steps, sweep.base.training.validation.eval_steps_interval
            ),
            reduction_factor=sweep.early_stopping.reduction_factor,
            brackets=sweep.early_stopping.brackets,
            # A trial that reaches the last step ends by itself, with its adapter written.
            stop_last_trials=False,
        )
    # metric and mode go to the searcher and the scheduler themselves: wrapped in the concurrency
    # limiter, the searcher would not receive them from TuneConfig.
    search = OptunaSearch(
        space=sweep.space(),
        metric=sweep.metric,
        mode="min",
        points_to_evaluate=[dict(sweep.base_point)],
        sampler=sweep.sampler_instance(),
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=search,
            scheduler=scheduler,
            num_samples=sweep.num_samples,
            max_concurrent_trials=max_concurrent,
        ),
        run_config=tune.RunConfig(
            name=sweep.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            verbose=1,
        ),
    )


def run_sweep(sweep: Sweep, *, build_options: BuildOptions | None = None) -> SweepOutcome:
    """Check, cache once, run the trials on the connected Ray (or a local one), write the results.

    ``sweep.base`` (the loaded config with the sweep's ``fixed`` settings) is what every trial starts from.
    """
    base = sweep.base
    if base.training.tracking.push_to_hub or base.training.tracking.push_checkpoints_to_hub:
        logger.warning(
            "push_to_hub applies to `raytuner train` only: no trial of a sweep publishes anything; train the "
            "best config with `raytuner train --config ...` to publish it"
        )
    request = read_settings(base, sweep.resources)
    # Each trial's GPUs and workers follow `raytuner train`'s rule, chosen once the cluster is known.
    with cluster_connection():
        return _check_cache_and_sweep(sweep, request.settle(), build_options=build_options)


def _check_cache_and_sweep(
    sweep: Sweep, settings: RaySettings, *, build_options: BuildOptions | None
) -> SweepOutcome:
    import ray

    base = sweep.base
    if on_cluster():
        base = place_on_cluster(base, settings)
    base, only_here = pin_local_paths(base)
    sweep = dataclasses.replace(sweep, base=base)  # every trial starts from the placed config
    for line in only_here:
        if on_cluster():
            logger.warning(
                "%s of the head node's copy of the job: trials on other nodes cannot read it", line
            )
    problems = _check_before_ray(sweep, settings)
    if problems:
        raise ConfigError(problems)
    encoders = cache_encoders(base)  # its settings passed the pre-flight check above
    output_dir = base.training.output_dir
    resuming = _check_record(sweep, output_dir)
    trials_dir = output_dir / TRIALS_FOLDER
    with ray_session(dashboard=True):
        record_seed(base)
        summary = run_cache(base, build_options or BuildOptions(), encoders)
        logger.info("cache (built once, shared by every trial):\n%s", summary.table())
        max_steps = total_steps(base.training.optimization, check_batches(base, workers=settings.num_workers))
        plan = TrialPlan(sweep=sweep, settings=settings, trials_dir=trials_dir)
        max_concurrent = concurrency(
            sweep, settings, {k: float(v) for k, v in ray.cluster_resources().items()}
        )
        logger.info(
            "sweep %s%s: %d trial(s), %d at a time, each %s + 1 CPU for its driver, %d steps; %s over %s; "
            "TPE sampler %s; early stopping %s",
            sweep.name,
            " (resumed)" if resuming else "",
            sweep.num_samples,
            max_concurrent,
            settings.describe(),
            max_steps,
            sweep.metric,
            ", ".join(f"{p.key} ({p.describe()})" for p in sweep.parameters),
            {"seed": sweep.seed, **sweep.sampler},
            "off" if sweep.early_stopping is None else f"ASHA on {sweep.metric}",
        )
        tuner = build_tuner(plan, max_steps=max_steps, max_concurrent=max_concurrent, output_dir=output_dir)
        grid = tuner.fit()
    stopped = stopped_trials(output_dir / SCHEDULER_STATE_FILE) if sweep.early_stopping else set()
    outcomes = sweep_results.collect_outcomes(grid, sweep, trials_dir, stopped=stopped)
    interrupted = len(outcomes) < sweep.num_samples or any(
        trial.status == sweep_results.UNFINISHED for trial in outcomes
    )
    best = sweep_results.best_outcome(outcomes)
    table = sweep_results.results_table(outcomes, sweep, best)
    sweep_results.write_csv(outcomes, sweep, output_dir / sweep_results.RESULTS_CSV)
    sweep_results.plot_curves(outcomes, sweep, output_dir / sweep_results.CURVES_PNG)
    importances = sweep_results.parameter_importances(outcomes, sweep)
    if importances:
        sweep_results.plot_importances(importances, sweep, output_dir / sweep_results.IMPORTANCE_PNG)
    if best is not None and not interrupted:
        sweep_results.write_best(best, sweep, output_dir)
    return SweepOutcome(
        outcomes=outcomes, best=best, interrupted=interrupted, output_dir=output_dir, table=table
    )


def tune_main(config: str, sweep_file: str, *, strict: bool = False) -> int:
    """The ``raytuner tune`` command: 0 with a best trial written, 130 when interrupted (it resumes).

    What stops the sweep, or leaves it without a best trial, is raised as a RaytunerError, which
    the command line prints (raytuner/cli.py).
    """
    run = load_config(config, strict=strict)
    sweep = read_sweep(sweep_file, run)
    outcome = run_sweep(sweep)
    print()
    print(outcome.table)
    output_dir = outcome.output_dir
    print()
    print(f"results:     {output_dir / sweep_results.RESULTS_CSV}")
    print(f"curves:      {output_dir / sweep_results.CURVES_PNG}")
    if (output_dir / sweep_results.IMPORTANCE_PNG).is_file():
        print(f"importance:  {output_dir / sweep_results.IMPORTANCE_PNG}")
    if outcome.interrupted:
        done = sum(1 for trial in outcome.outcomes if trial.status != sweep_results.UNFINISHED)
        print(
            f"error: sweep {sweep.name} interrupted with {done} of {sweep.num_samples} trial(s) ended; "
            "run the same command again to resume it",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if outcome.best is None:
        raise SweepError(
            f"no trial of sweep {sweep.name} trained to the end (see the table above); nothing to pick"
        )
    print(f"best config: {output_dir / sweep_results.BEST_CONFIG}  (raytuner train --config ...)")
    print(
        f"best trial:  {outcome.best.trial_id}, {sweep.metric} {outcome.best.metric:.4f}: {output_dir / sweep_results.BEST_FOLDER}"
    )
    return 0
