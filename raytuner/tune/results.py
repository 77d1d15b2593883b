"""What a sweep leaves behind: the results table (printed and CSV), plots, the best config and adapter.

``output_dir`` of the base config holds, after ``raytuner tune``::

    results.csv              one row per trial: its point, status, steps and losses
    sweep_eval_loss.png      eval loss (or training loss) against step, every trial
    param_importance.png     fANOVA importance of each swept key (optuna), when it can be computed
    best_config.json         config.json of the best trial, ready for ``raytuner train --config``
    best_lycoris_config.json beside it when the sweep changed lycoris options
    best/                    the best trial's adapter, model card, loss curve and validation images
    trials/<trial id>/       every trial's own outputs
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from raytuner.config.formats import options_as_object, read_json
from raytuner.config.overrides import PRESET_MAPS, rescale_preset_entry
from raytuner.config.paths import display
from raytuner.evaluate.metrics import read_metrics
from raytuner.filenames import ADAPTER_FILENAME
from raytuner.tune.sweep import Sweep

logger = logging.getLogger(__name__)

RESULTS_CSV = "results.csv"
CURVES_PNG = "sweep_eval_loss.png"
IMPORTANCE_PNG = "param_importance.png"
BEST_CONFIG = "best_config.json"
BEST_LYCORIS = "best_lycoris_config.json"
BEST_FOLDER = "best"
BEST_RUN_FOLDER = "best_run"
# Left out of best/: the trial's checkpoints and logs stay with the trial.
_NOT_COPIED = ("checkpoints", "logs")

COMPLETED = "completed"
STOPPED = "stopped early"
ERROR = "error"
UNFINISHED = "unfinished"


@dataclass(frozen=True, kw_only=True)
class TrialOutcome:
    """One trial as the results table shows it."""

    trial_id: str
    number: int  # 1 for the first trial Tune created (the base config), then in order
    point: dict[str, Any]
    status: str
    steps: int
    metric: float | None  # the sweep's metric at the trial's last report
    best_eval_loss: float | None
    output_dir: Path
    error: str | None = None
    curve: tuple[tuple[int, float], ...] = field(default=())  # (step, metric) the plot draws


def collect_outcomes(
    result_grid: Any, sweep: Sweep, trials_dir: Path, *, stopped: set[str]
) -> list[TrialOutcome]:
    """The trials of a ``ResultGrid``, in the order Tune created them (the base config first).

    ``stopped`` holds the ids of the trials early stopping ended; any other trial without an error
    or an adapter was cut short by an interruption.
    """
    outcomes = []
    for result in result_grid:
        metrics = dict(result.metrics or {})
        config = dict(result.config or {})
        trial_id, number = _trial_id_and_number(result, metrics)
        output_dir = trials_dir / trial_id
        last_step = int(metrics.get("step", 0) or 0)
        # A stopped trial's workers train on while Tune tears it down: what they log after the last
        # report Tune acted on is not part of the trial's record.
        entries = [
            entry
            for entry in (read_metrics(output_dir / "logs" / "metrics.jsonl") if output_dir.is_dir() else [])
            if int(entry["step"]) <= last_step
        ]
        evals = [(int(e["step"]), float(e["eval_loss"])) for e in entries if e.get("kind") == "eval"]
        losses = [
            (int(e["step"]), float(e["loss"])) for e in entries if "loss" in e and e.get("kind") != "eval"
        ]
        if result.error is not None:
            status, error = ERROR, _one_line(result.error)
        elif trial_id in stopped:
            status, error = STOPPED, None
        elif (output_dir / ADAPTER_FILENAME).is_file():
            status, error = COMPLETED, None
        else:
            status, error = UNFINISHED, None
        value = metrics.get(sweep.metric)
        outcomes.append(
            TrialOutcome(
                trial_id=trial_id,
                number=number,
                point={parameter.key: config.get(parameter.key) for parameter in sweep.parameters},
                status=status,
                steps=last_step,
                metric=float(value) if isinstance(value, int | float) and math.isfinite(value) else None,
                best_eval_loss=min((loss for _, loss in evals), default=None),
                output_dir=output_dir,
                error=error,
                curve=tuple(evals if sweep.metric == "eval_loss" else losses),
            )
        )
    return sorted(outcomes, key=lambda outcome: outcome.number)


def _trial_id_and_number(result: Any, metrics: dict[str, Any]) -> tuple[str, int]:
    """Tune names a trial's folder ``<trainable>_<trial id>_<creation number>_<tag>_<date>``."""
    name = Path(str(result.path)).name
    trial_id = str(metrics.get("trial_id") or "")
    if not trial_id:
        found = re.search(r"_([0-9a-f]{5,})_(\d+)_", name)
        return (found.group(1), int(found.group(2))) if found else (name, 0)
    found = re.search(rf"_{re.escape(trial_id)}_(\d+)_", name)
    return trial_id, int(found.group(1)) if found else 0


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__


def best_outcome(outcomes: Sequence[TrialOutcome]) -> TrialOutcome | None:
    """The completed trial with the lowest metric (a trial stopped early never trained to the end)."""
    finished = [outcome for outcome in outcomes if outcome.status == COMPLETED and outcome.metric is not None]
    return min(finished, key=lambda outcome: outcome.metric or math.inf, default=None)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def results_table(outcomes: Sequence[TrialOutcome], sweep: Sweep, best: TrialOutcome | None) -> str:
    keys = [parameter.key for parameter in sweep.parameters]
    header = ("#", "trial", "status", *keys, "steps", sweep.metric, "best eval_loss", "")
    rows = [
        (
            str(outcome.number),
            outcome.trial_id,
            outcome.status,
            *(_format(outcome.point.get(key)) for key in keys),
            str(outcome.steps),
            _format(outcome.metric),
            _format(outcome.best_eval_loss),
            _remark(outcome, best),
        )
        for outcome in outcomes
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths).rstrip())
    for outcome in outcomes:
        if outcome.error:
            lines.append(f"trial {outcome.trial_id} failed: {outcome.error}")
    return "\n".join(lines)


def _remark(outcome: TrialOutcome, best: TrialOutcome | None) -> str:
    remarks = ["base config"] if outcome.number == 1 else []
    if best is not None and outcome.trial_id == best.trial_id:
        remarks.append("<- best")
    return ", ".join(remarks)


def write_csv(outcomes: Sequence[TrialOutcome], sweep: Sweep, path: Path) -> Path:
    keys = [parameter.key for parameter in sweep.parameters]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "trial",
                "trial_id",
                "status",
                *keys,
                "steps",
                sweep.metric,
                "best_eval_loss",
                "output_dir",
                "error",
            ]
        )
        for outcome in outcomes:
            writer.writerow(
                [
                    outcome.number,
                    outcome.trial_id,
                    outcome.status,
                    *(outcome.point.get(key) for key in keys),
                    outcome.steps,
                    "" if outcome.metric is None else outcome.metric,
                    "" if outcome.best_eval_loss is None else outcome.best_eval_loss,
                    display(outcome.output_dir),
                    outcome.error or "",
                ]
            )
    return path


def plot_curves(outcomes: Sequence[TrialOutcome], sweep: Sweep, path: Path) -> Path | None:
    """The metric against step for every trial; trials stopped early dashed, the best one bold."""
    drawn = [outcome for outcome in outcomes if outcome.curve]
    if not drawn:
        return None
    best = best_outcome(outcomes)
    figure = Figure(figsize=(7, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for outcome in drawn:
        steps, values = zip(*outcome.curve, strict=True)
        is_best = best is not None and outcome.trial_id == best.trial_id
        label = f"#{outcome.number} {outcome.trial_id} ({outcome.status}{', best' if is_best else ''})"
        axes.plot(
            steps,
            values,
            linestyle="--" if outcome.status == STOPPED else "-",
            linewidth=2.5 if is_best else 1,
            marker="o" if sweep.metric == "eval_loss" else None,
            markersize=3,
            label=label,
        )
    axes.set(
        xlabel="step",
        ylabel=sweep.metric.replace("_", " "),
        title=f"sweep {sweep.name}: {sweep.metric} per trial",
    )
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def parameter_importances(outcomes: Sequence[TrialOutcome], sweep: Sweep) -> dict[str, float] | None:
    """optuna's fANOVA importance of each swept key; None with fewer than 2 trials to go on.

    Every trial that reported the metric counts with its last value, a trial stopped early with
    the value it was stopped at: the values Ray Tune gave the sampler, so this is the importance
    the study itself would show.
    """
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    completed = [
        outcome
        for outcome in outcomes
        if outcome.status in (COMPLETED, STOPPED) and outcome.metric is not None
    ]
    if len(completed) < 2:
        return None
    space = sweep.space()
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.RandomSampler(seed=sweep.seed))
    for outcome in completed:
        study.add_trial(
            optuna.trial.create_trial(params=dict(outcome.point), distributions=space, value=outcome.metric)
        )
    try:
        importances = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=sweep.seed))
    except (RuntimeError, ValueError) as error:  # e.g. every completed trial drew the same values
        logger.info("parameter importance not computed: %s", error)
        return None
    return {key: float(value) for key, value in importances.items()}


def plot_importances(importances: dict[str, float], sweep: Sweep, path: Path) -> Path:
    figure = Figure(figsize=(6, 0.6 + 0.45 * len(importances)))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    keys = list(reversed(importances))
    axes.barh(keys, [importances[key] for key in keys])
    axes.set(
        xlabel=f"importance for the last reported {sweep.metric} (fANOVA)",
        xlim=(0, 1),
        title=f"sweep {sweep.name}",
    )
    axes.grid(alpha=0.3, axis="x")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def write_best(best: TrialOutcome, sweep: Sweep, output_dir: Path) -> tuple[Path, Path]:
    """``best_config.json`` (and its lycoris file) and ``best/`` with the best trial's outputs."""
    folder = output_dir / BEST_FOLDER
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(
        best.output_dir, folder, ignore=lambda _dir, names: [n for n in names if n in _NOT_COPIED]
    )
    base = sweep.base
    training_values: dict[str, Any] = dict(sweep.fixed["training"])
    lycoris_values: dict[str, Any] = dict(sweep.fixed["lycoris"])
    targets = {parameter.key: parameter.target for parameter in sweep.parameters}
    for key, value in best.point.items():
        (training_values if targets[key] == "training" else lycoris_values)[key] = value
    for key, value in (
        ("ray_num_workers", sweep.resources.num_workers),
        ("ray_cpus_per_worker", sweep.resources.cpus_per_worker),
        ("ray_gpus_per_worker", sweep.resources.gpus_per_worker),
    ):
        if value is not None:
            training_values[key] = value
    config = _without_keys(options_as_object(base.sources["config"]), training_values)
    config.update(training_values)
    for role in ("data_backend_config", "lycoris_config", "user_prompt_library"):
        if role in base.sources:
            config = _without_keys(config, {role: None})
            config[role] = display(base.sources[role])
    config = _without_keys(config, {"output_dir": None})
    config["output_dir"] = display(output_dir / BEST_RUN_FOLDER)
    if lycoris_values and "lycoris_config" in base.sources:
        lycoris = read_json(base.sources["lycoris_config"])
        lycoris_path = output_dir / BEST_LYCORIS
        lycoris_path.write_text(
            json.dumps(_override_lycoris_raw(lycoris, lycoris_values), indent=4) + "\n", encoding="utf-8"
        )
        config["lycoris_config"] = display(lycoris_path)
    config_path = output_dir / BEST_CONFIG
    config_path.write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
    return config_path, folder


def _without_keys(raw: dict[str, Any], keys: dict[str, Any]) -> dict[str, Any]:
    """``raw`` without ``keys`` in either spelling (``key`` or ``--key``), order kept."""
    return {written: value for written, value in raw.items() if written.removeprefix("--") not in keys}


def _override_lycoris_raw(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The lycoris file with ``values`` at the top level and its preset entries rescaled to match."""
    changes = {key: (raw.get(key), value) for key, value in values.items()}
    updated = {**raw, **values}
    preset = updated.get("apply_preset")
    if isinstance(preset, dict):
        preset = json.loads(json.dumps(preset))
        for map_name in PRESET_MAPS:
            for options in (preset.get(map_name) or {}).values():
                if isinstance(options, dict):
                    rescale_preset_entry(options, changes)
        updated["apply_preset"] = preset
    return updated
