"""``sweep.json``: what ``raytuner tune`` searches, how, and for how long — read and checked.

A sweep file names the search axes (``parameters``), settings every trial shares (``fixed``),
the number of trials, the Optuna TPE sampler's settings, ASHA early stopping and the Ray
resources of one trial::

    {
      "num_samples": 12,
      "parameters": {
        "learning_rate": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
        "factor": {"type": "choice", "values": [4, 8, 16]},
        "flow_schedule_shift": {"type": "uniform", "low": 1.0, "high": 4.0}
      },
      "fixed": {"flow_schedule_auto_shift": false, "max_train_steps": 1000},
      "sampler": {"n_startup_trials": 4},
      "early_stopping": {"grace_period": 100, "reduction_factor": 3}
    }

Everything is checked before Ray starts: every key against the allow-lists of
:mod:`raytuner.tune.space`, every range's bounds (and every choice) loaded into the config as a
trial would load it, and the base config — the first point evaluated — inside the ranges.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raytuner.config import ConfigError, RunConfig
from raytuner.config.fields import build, rule
from raytuner.config.loader import read_json
from raytuner.config.overrides import override_run
from raytuner.config.paths import display
from raytuner.config.surface import did_you_mean
from raytuner.evaluate.eval_loss import eval_datasets
from raytuner.models.registry import get_family
from raytuner.train.settings import RayOverrides
from raytuner.tune.space import Parameter, Target, classify_fixed_key, classify_key, parse_parameter

logger = logging.getLogger(__name__)

METRICS = ("eval_loss", "loss")
DEFAULT_NUM_SAMPLES = 8
DEFAULT_REDUCTION_FACTOR = 3
# TPE's own default is 10 random start-up trials, which makes a short sweep a random search.
MAX_DEFAULT_STARTUP_TRIALS = 10
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
TOP_LEVEL_KEYS = (
    "name",
    "num_samples",
    "max_concurrent_trials",
    "seed",
    "metric",
    "parameters",
    "fixed",
    "sampler",
    "early_stopping",
    "resources_per_trial",
)
RESOURCE_KEYS = ("num_workers", "cpus_per_worker", "gpus_per_worker")
EARLY_STOPPING_KEYS = ("grace_period", "reduction_factor", "brackets")
SHIFT_KEYS = ("flow_schedule_shift", "flow_schedule_auto_shift")
# Every key that shapes the training sigmas: a family with its own schedule ignores them all.
SIGMA_SCHEDULE_KEYS = (
    *SHIFT_KEYS,
    "flow_sigmoid_scale",
    "flow_use_uniform_schedule",
    "flow_use_beta_schedule",
    "flow_beta_schedule_alpha",
    "flow_beta_schedule_beta",
)


@dataclass(frozen=True, kw_only=True)
class SweepCounts:
    """How many trials, how many at once, and the sampler's seed (unset: the run's seed)."""

    num_samples: int = field(default=DEFAULT_NUM_SAMPLES, metadata=rule(ge=1))
    max_concurrent_trials: int | None = field(default=None, metadata=rule(ge=1))
    seed: int | None = field(default=None, metadata=rule(ge=0))


@dataclass(frozen=True, kw_only=True)
class TrialResources:
    """``resources_per_trial``: each trial's Ray Train workers, as ``raytuner train``'s flags."""

    num_workers: int | None = field(default=None, metadata=rule(ge=1))
    cpus_per_worker: float | None = field(default=None, metadata=rule(gt=0))
    gpus_per_worker: float | None = field(default=None, metadata=rule(ge=0))


@dataclass(frozen=True, kw_only=True)
class EarlyStopping:
    """ASHA's settings, in training steps (its time attribute is the reported ``step``)."""

    grace_period: int | None = field(
        default=None, metadata=rule(ge=1)
    )  # None: the eval interval, else a ninth of a trial
    reduction_factor: float = field(default=DEFAULT_REDUCTION_FACTOR, metadata=rule(gt=1))
    brackets: int = field(default=1, metadata=rule(ge=1))

    def grace_for(self, total_steps: int, eval_interval: int | None) -> int:
        if self.grace_period is not None:
            return self.grace_period
        return max(1, min(total_steps, eval_interval or total_steps // 9))


@dataclass(kw_only=True)
class Sweep:
    """A checked sweep file, with the base run every trial starts from (``fixed`` applied)."""

    path: Path
    name: str
    parameters: tuple[Parameter, ...]
    fixed: dict[Target, dict[str, Any]]
    num_samples: int
    max_concurrent_trials: int | None
    seed: int
    metric: str
    sampler: dict[str, Any]
    early_stopping: EarlyStopping | None
    resources: RayOverrides
    base: RunConfig
    base_point: dict[str, Any]
    raw: dict[str, Any] = field(default_factory=dict)

    def trial_run(self, point: dict[str, Any], *, where: str) -> RunConfig:
        """The base run with one point of the search space applied."""
        split: dict[Target, dict[str, Any]] = {"training": {}, "lycoris": {}}
        targets = {parameter.key: parameter.target for parameter in self.parameters}
        for key, value in point.items():
            split[targets[key]][key] = value
        return override_run(self.base, training=split["training"], lycoris=split["lycoris"], where=where)

    def space(self) -> dict[str, Any]:
        return {parameter.key: parameter.distribution() for parameter in self.parameters}

    def fingerprint(self) -> str:
        """What must not change for an interrupted sweep to be resumed: the sweep and the base config."""
        base = self.base.to_dict(redact=True)
        base.pop("warnings", None)
        base.pop("notes", None)
        text = json.dumps({"sweep": self.raw, "base": base}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def sampler_instance(self) -> Any:
        from optuna.samplers import TPESampler

        return TPESampler(seed=self.seed, **self.sampler)


def read_sweep(path: str | Path, run: RunConfig) -> Sweep:
    """The sweep file checked against ``run``; ``ConfigError`` with one line per problem."""
    sweep_path = Path(path).expanduser()
    raw = read_json(sweep_path)
    where = display(sweep_path.resolve())
    if not isinstance(raw, dict):
        raise ConfigError(f'{where}: expected a JSON object ({{"parameters": {{...}}}}), got a list or value')
    problems: list[str] = []
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            problems.append(
                f"{where}: '{key}' is not a sweep setting{did_you_mean(key, TOP_LEVEL_KEYS)}; "
                f"expected one of: {', '.join(TOP_LEVEL_KEYS)}"
            )
    lycoris_enabled = run.lycoris is not None
    parameters = _parameters(raw.get("parameters"), where=where, lycoris=lycoris_enabled, problems=problems)
    fixed = _fixed(raw.get("fixed", {}), where=where, lycoris=lycoris_enabled, problems=problems)
    for parameter in parameters:
        if parameter.key in fixed[parameter.target]:
            problems.append(
                f'{where}: \'{parameter.key}\' is both in "parameters" and in "fixed"; keep it in one'
            )
    problems.extend(_shift_problems(run, parameters, fixed, where=where))
    # The same field rules as config.json's options (raytuner/config/fields.py).
    counts = build(SweepCounts, raw, where=where, problems=problems) or SweepCounts()
    num_samples = counts.num_samples
    seed = run.seed if counts.seed is None else counts.seed
    name = raw.get("name", sweep_path.stem)
    if not isinstance(name, str) or not _NAME.match(name):
        problems.append(
            f"{where}: 'name' = {name!r}: expected letters, digits, '.', '_' or '-' (it names the sweep's folder)"
        )
    metric = _metric(raw.get("metric"), run, where=where, problems=problems)
    sampler = _sampler(raw.get("sampler", {}), num_samples, seed, where=where, problems=problems)
    early_stopping = _early_stopping(raw.get("early_stopping", {}), where=where, problems=problems)
    resources = _resources(raw.get("resources_per_trial", {}), where=where, problems=problems)
    if problems:
        raise ConfigError(problems)

    base = override_run(run, training=fixed["training"], lycoris=fixed["lycoris"], where=f"{where}: fixed")
    base_point, point_problems = _check_points(base, parameters, where=where)
    if point_problems:
        raise ConfigError(point_problems)
    return Sweep(
        path=sweep_path.resolve(),
        name=str(name),
        parameters=parameters,
        fixed=fixed,
        num_samples=num_samples,
        max_concurrent_trials=counts.max_concurrent_trials,
        seed=seed,
        metric=metric,
        sampler=sampler,
        early_stopping=early_stopping,
        resources=resources,
        base=base,
        base_point=base_point,
        raw=raw,
    )


def _parameters(raw: Any, *, where: str, lycoris: bool, problems: list[str]) -> tuple[Parameter, ...]:
    if not isinstance(raw, dict) or not raw:
        problems.append(
            f'{where}: "parameters" = {raw!r}: expected an object with at least one axis, e.g. '
            '{"learning_rate": {"type": "loguniform", "low": 1e-5, "high": 1e-3}}'
        )
        return ()
    parameters: list[Parameter] = []
    seen: set[str] = set()
    for written, spec in raw.items():
        try:
            key, target = classify_key(written, lycoris_enabled=lycoris)
        except ValueError as error:
            problems.append(f"{where}: parameters '{written}' {error}")
            continue
        if key in seen:
            problems.append(f"{where}: parameters '{key}' is given twice (with and without '--'); keep one")
            continue
        seen.add(key)
        try:
            parameters.append(parse_parameter(key, target, spec, where=f"{where}: parameters '{key}'"))
        except ValueError as error:
            problems.append(str(error))
    return tuple(parameters)


def _fixed(raw: Any, *, where: str, lycoris: bool, problems: list[str]) -> dict[Target, dict[str, Any]]:
    fixed: dict[Target, dict[str, Any]] = {"training": {}, "lycoris": {}}
    if not isinstance(raw, dict):
        problems.append(f'{where}: "fixed" = {raw!r}: expected an object of config.json or lycoris settings')
        return fixed
    for written, value in raw.items():
        try:
            key, target = classify_fixed_key(written, lycoris_enabled=lycoris)
        except ValueError as error:
            problems.append(f"{where}: fixed '{written}' {error}")
            continue
        fixed[target][key] = value
    return fixed


def _shift_problems(
    run: RunConfig,
    parameters: tuple[Parameter, ...],
    fixed: dict[Target, dict[str, Any]],
    *,
    where: str,
) -> list[str]:
    swept = {parameter.key for parameter in parameters}
    config = display(run.sources["config"])
    fixed_schedule = get_family(run.training.model.model_family).fixed_sigma_schedule
    if fixed_schedule:
        return [
            f"{where}: parameters '{key}': {fixed_schedule}, so every trial would train the same; "
            'remove it from "parameters"'
            for key in SIGMA_SCHEDULE_KEYS
            if key in swept
        ]
    if "flow_schedule_shift" not in swept:
        return []
    if "flow_schedule_auto_shift" in swept:
        return [
            f"{where}: parameters 'flow_schedule_auto_shift' with 'flow_schedule_shift': with auto-shift on the "
            "static shift is not used, so half the space trains the same; sweep the shift with "
            '"fixed": {"flow_schedule_auto_shift": false}'
        ]
    auto = fixed["training"].get("flow_schedule_auto_shift", run.training.flow.flow_schedule_auto_shift)
    if str(auto).strip().lower() in ("true", "1", "yes", "on"):
        return [
            f"{where}: parameters 'flow_schedule_shift': {config} sets flow_schedule_auto_shift true, whose "
            "resolution-dependent shift replaces the static one, so every trial would train the same; "
            'add "flow_schedule_auto_shift": false to "fixed"'
        ]
    return []


def _known_keys(
    raw: dict[str, Any], allowed: tuple[str, ...], *, section: str, where: str, problems: list[str]
) -> None:
    for key in raw:
        if key not in allowed:
            problems.append(
                f"{where}: {section} '{key}' is not known{did_you_mean(key, allowed)}; "
                f"expected one of: {', '.join(allowed)}"
            )


def _metric(value: Any, run: RunConfig, *, where: str, problems: list[str]) -> str:
    metric = "eval_loss" if value is None else value
    if metric not in METRICS:
        problems.append(f"{where}: 'metric' = {value!r}: expected one of {', '.join(METRICS)}")
        return "eval_loss"
    if metric == "eval_loss" and not eval_datasets(run):
        logger.warning(
            "%s: no dataset_type eval dataset in %s, so trials are compared and stopped early on the "
            "training loss, which is noisier; add an eval dataset for a fair comparison",
            where,
            display(run.sources.get("data_backend_config", run.sources["config"])),
        )
        return "loss"
    return str(metric)


def _sampler(
    raw: Any, num_samples: int | None, seed: int | None, *, where: str, problems: list[str]
) -> dict[str, Any]:
    from optuna.samplers import TPESampler

    if not isinstance(raw, dict):
        problems.append(f'{where}: "sampler" = {raw!r}: expected an object of TPESampler settings')
        return {}
    accepted = [
        name for name in inspect.signature(TPESampler.__init__).parameters if name not in ("self", "seed")
    ]
    settings: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "seed":
            problems.append(f"{where}: sampler 'seed': set the sweep's top-level \"seed\" instead")
        elif key not in accepted or key in ("gamma", "weights", "categorical_distance_func"):
            problems.append(
                f"{where}: sampler '{key}' is not a TPESampler setting raytuner passes on"
                f"{did_you_mean(key, accepted)}; expected one of: n_startup_trials, n_ei_candidates, "
                "multivariate, group, constant_liar, consider_endpoints, prior_weight"
            )
        else:
            settings[key] = value
    if "n_startup_trials" not in settings and num_samples:
        settings["n_startup_trials"] = min(MAX_DEFAULT_STARTUP_TRIALS, max(1, num_samples // 4))
    startup = settings.get("n_startup_trials")
    if isinstance(startup, bool) or not isinstance(startup, int) or startup < 0:
        problems.append(f"{where}: sampler 'n_startup_trials' = {startup!r}: expected an integer >= 0")
        return settings
    try:
        TPESampler(seed=seed, **settings)
    except (TypeError, ValueError) as error:
        problems.append(f'{where}: "sampler": optuna\'s TPESampler refuses these settings: {error}')
    if num_samples and startup >= num_samples:
        logger.warning(
            "%s: sampler n_startup_trials %d >= num_samples %d: every trial is a random draw (no TPE)",
            where,
            startup,
            num_samples,
        )
    return settings


def _early_stopping(raw: Any, *, where: str, problems: list[str]) -> EarlyStopping | None:
    if raw is False or raw is None:
        return None
    if not isinstance(raw, dict):
        problems.append(
            f'{where}: "early_stopping" = {raw!r}: expected an object of ASHA settings '
            '({"grace_period": 100, "reduction_factor": 3}) or false'
        )
        return None
    _known_keys(raw, EARLY_STOPPING_KEYS, section="early_stopping", where=where, problems=problems)
    return build(EarlyStopping, raw, where=f"{where}: early_stopping", problems=problems)


def _resources(raw: Any, *, where: str, problems: list[str]) -> RayOverrides:
    if not isinstance(raw, dict):
        problems.append(
            f'{where}: "resources_per_trial" = {raw!r}: expected an object with {", ".join(RESOURCE_KEYS)}'
        )
        return RayOverrides()
    _known_keys(raw, RESOURCE_KEYS, section="resources_per_trial", where=where, problems=problems)
    where = f"{where}: resources_per_trial"
    resources = build(TrialResources, raw, where=where, problems=problems) or TrialResources()
    return RayOverrides(
        num_workers=resources.num_workers,
        cpus_per_worker=resources.cpus_per_worker,
        gpus_per_worker=resources.gpus_per_worker,
        gpus_source=f"{where} gpus_per_worker =",
    )


def _base_value(run: RunConfig, parameter: Parameter) -> Any:
    value = (
        run.training.flat()[parameter.key]
        if parameter.target == "training"
        else getattr(run.lycoris, parameter.key)
    )
    if parameter.key == "flow_schedule_shift" and (value is None or value <= 0):
        # A static shift of 0 or less applies none, exactly as a shift of 1.0 does.
        return 1.0
    return value


def _check_points(
    base: RunConfig, parameters: tuple[Parameter, ...], *, where: str
) -> tuple[dict[str, Any], list[str]]:
    """The base config's point, and what is wrong with it or with any range's bounds."""
    problems: list[str] = []
    base_point: dict[str, Any] = {}
    config = display(base.sources["config"])
    for parameter in parameters:
        value = _base_value(base, parameter)
        base_point[parameter.key] = value
        if not parameter.contains(value):
            origin = config if parameter.target == "training" else display(base.sources["lycoris_config"])
            problems.append(
                f"{where}: parameters '{parameter.key}': the base config's value {value!r} ({origin}) is outside "
                f"{parameter.describe()}; the sweep evaluates the base config first, so widen the range to "
                "include it (or change the base config)"
            )
        for corner in parameter.corners():
            point = {parameter.key: corner}
            try:
                _apply(base, parameter, point, where=f"{where}: parameters '{parameter.key}'")
            except ConfigError as error:
                problems.extend(error.problems)
    return base_point, problems


def _apply(base: RunConfig, parameter: Parameter, point: dict[str, Any], *, where: str) -> RunConfig:
    if parameter.target == "training":
        return override_run(base, training=point, where=where)
    return override_run(base, lycoris=point, where=where)
