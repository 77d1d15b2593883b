"""``raytuner tune`` end to end: real Ray Tune, Optuna and ASHA over tiny Cosmos2 training runs.

One seeded 3-trial sweep, one trial at a time, serves every test here. It starts as
``raytuner tune`` in a subprocess (a local Ray of its own), is interrupted (Ctrl+C) as its second
trial starts, and is resumed by ``run_sweep`` in this process on the session's 2-node Ray, which
finishes it. The scenario is built for early stopping: the base config (trial 1) has the highest
learning rate in the range, and trial 2 (seed 0) has a learning rate about 40 times lower with
its other values near the base's, so after 2 steps its eval loss is behind the base's and ASHA (reduction factor 2, its
only rung at step 2 of 3) stops it. TPE starts after 1 trial, so trials 2 and 3 are its suggestions
given the results before each, made on either side of the interruption.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from raytuner.cache.format import read_manifest
from raytuner.config import load_config
from raytuner.evaluate.metrics import read_metrics
from raytuner.filenames import ADAPTER_FILENAME
from raytuner.storage import Location
from raytuner.tune import results as sweep_results
from raytuner.tune.command import SweepOutcome, run_sweep
from raytuner.tune.sweep import read_sweep
from tests.cache.helpers import write_run_files
from tests.ray_head import clean_environment, short_temp_dir
from tests.training_data import Data
from tests.wandb_records import offline_runs

pytestmark = pytest.mark.slow

# 3 steps: eval at steps 0, 2 and 3, and one ASHA rung (step 2) before the last step.
STEPS = 3
BASE_LEARNING_RATE = 3e-2
CONFIG: dict[str, Any] = {
    "train_batch_size": 2,
    "learning_rate": BASE_LEARNING_RATE,
    "optimizer": "torch-adamw",
    "lr_scheduler": "constant",
    "mixed_precision": "no",
    "gradient_checkpointing": False,
    "max_train_steps": STEPS,
    "checkpoint_step_interval": 2,
    "validation_step_interval": STEPS,
    "validation_resolution": "32x32",
    "validation_num_inference_steps": 2,
    "eval_timesteps": 4,
    "eval_steps_interval": 2,
    "report_to": "all",  # TensorBoard, and W&B offline (the fixtures set WANDB_MODE)
}
SWEEP: dict[str, Any] = {
    "name": "test-sweep",
    "num_samples": 3,
    "max_concurrent_trials": 1,
    "seed": 0,
    "parameters": {
        "learning_rate": {"type": "loguniform", "low": 1e-4, "high": BASE_LEARNING_RATE},
        "factor": {"type": "choice", "values": [2, 4]},
        "flow_schedule_shift": {"type": "uniform", "low": 1.0, "high": 3.0},
    },
    "fixed": {"flow_schedule_auto_shift": False},
    "sampler": {"n_startup_trials": 1},
    "early_stopping": {"grace_period": 2, "reduction_factor": 2},
    "resources_per_trial": {"num_workers": 1},
}


@dataclass(frozen=True)
class Interruption:
    """What the interrupted ``raytuner tune`` left, seen before the sweep was resumed."""

    exit_code: int
    log: str
    ended: list[Path]  # the trials that had ended (the first), in the order they started
    histories: list[str]  # their metrics.jsonl
    adapter_time: int  # the first trial's adapter's mtime (ns)
    steps_logged_by_trial_2: set[int]  # when the signal went


@dataclass(frozen=True)
class Sweep:
    config: Path
    sweep: Path
    interruption: Interruption
    resumed_log: list[str]  # raytuner.tune.command's messages while this process resumed the sweep
    outcome: SweepOutcome
    cache_counts: dict[str, tuple[int, int]]  # cache folder -> (rows, rows ever encoded)


def write_sweep_files(root: Path, data: Data, **config: Any) -> tuple[Path, Path]:
    files = write_run_files(root, data.model, data.datasets, **{**CONFIG, **config})
    sweep = root / "sweep.json"
    sweep.write_text(json.dumps(SWEEP, indent=2))
    return files.config, sweep


def cache_counts(data: Data) -> dict[str, tuple[int, int]]:
    folders = [d["cache_dir_vae"] for d in data.datasets if "cache_dir_vae" in d]
    folders += [d["cache_dir"] for d in data.datasets if d.get("dataset_type") == "text_embeds"]
    counts = {}
    for folder in folders:
        manifest = read_manifest(Location(uri=str(folder)))
        assert manifest is not None, folder
        counts[folder] = (manifest.rows, manifest.encoded)
    return counts


@pytest.fixture(scope="module")
def data(cosmos_data: Data) -> Data:
    """The session's 8 training and 2 eval images: the sweep's cache step builds their cache when no
    earlier run has, and finds it built otherwise; either way no trial encodes anything."""
    return cosmos_data


@pytest.fixture(scope="module")
def interrupted_sweep(ray_cluster, data: Data, tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    """The sweep: interrupted as ``raytuner tune`` as trial 2 starts, resumed here to its end.

    The signal goes while trial 2's workers start (seconds), not between two of its steps (a
    fraction of one): a trial resumed from a checkpoint is Ray Train's own restore of the trial's
    pinned run, tested in the training tests.
    """
    root = tmp_path_factory.mktemp("tune")
    config, sweep_file = write_sweep_files(root, data)
    interruption = _interrupt_at_trial_2(config, sweep_file, tmp_path_factory)
    messages = _Messages()
    logger = logging.getLogger("raytuner.tune.command")
    level = logger.level
    logger.setLevel(logging.INFO)  # as the command line sets it
    logger.addHandler(messages)
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("WANDB_MODE", "offline")
            outcome = run_sweep(read_sweep(sweep_file, load_config(config)))
    finally:
        logger.removeHandler(messages)
        logger.setLevel(level)
    return Sweep(
        config=config,
        sweep=sweep_file,
        interruption=interruption,
        resumed_log=messages.lines,
        outcome=outcome,
        cache_counts=cache_counts(data),
    )


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _interrupt_at_trial_2(
    config: Path, sweep_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Interruption:
    root = config.parent
    log = root / "first.log"
    trials_dir = root / "output" / "trials"
    temp_dir, remove_temp = short_temp_dir(tmp_path_factory, "rt")
    process = None
    try:
        process = _launch(config, sweep_file, log, temp_dir)

        def second_trial_starting() -> bool:
            return len(_started_trials(trials_dir)) == 2

        _wait_for(second_trial_starting, process, log, poll=0.1)
        logged = _logged_steps(_started_trials(trials_dir)[1])
        process.send_signal(signal.SIGINT)  # Ctrl+C
        exit_code = process.wait(timeout=180)
    finally:
        if process is not None and process.poll() is None:
            process.kill()
        if remove_temp:
            shutil.rmtree(temp_dir, ignore_errors=True)
    ended = _started_trials(trials_dir)[:1]
    return Interruption(
        exit_code=exit_code,
        log=log.read_text(),
        ended=ended,
        histories=[(trial / "logs" / "metrics.jsonl").read_text() for trial in ended],
        adapter_time=(ended[0] / ADAPTER_FILENAME).stat().st_mtime_ns,
        steps_logged_by_trial_2=logged,
    )


def assert_same_points(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-9), (key, first, second)


def test_a_three_trial_sweep_writes_the_table_plots_best_config_and_adapter(interrupted_sweep: Sweep) -> None:
    outcome = interrupted_sweep.outcome
    assert not outcome.interrupted
    trials = outcome.outcomes
    assert [trial.number for trial in trials] == [1, 2, 3]
    base = trials[0]
    assert base.point == {"learning_rate": BASE_LEARNING_RATE, "factor": 4, "flow_schedule_shift": 3.0}
    assert base.status == sweep_results.COMPLETED and base.steps == STEPS
    output_dir = outcome.output_dir
    rows = (output_dir / sweep_results.RESULTS_CSV).read_text().splitlines()
    assert len(rows) == 1 + 3 and rows[0].startswith("trial,trial_id,status,learning_rate,factor")
    assert (output_dir / sweep_results.CURVES_PNG).stat().st_size > 0
    assert (output_dir / sweep_results.IMPORTANCE_PNG).stat().st_size > 0
    for trial in trials:
        assert trial.curve and trial.curve[0][0] == 0  # eval loss from the baseline on
        assert f" {trial.trial_id} " in f" {outcome.table} "

    best = outcome.best
    assert best is not None and best.status == sweep_results.COMPLETED
    completed = [trial for trial in trials if trial.status == sweep_results.COMPLETED]
    assert best.metric == min(trial.metric for trial in completed)
    copied = load_file(str(output_dir / "best" / ADAPTER_FILENAME))
    trained = load_file(str(best.output_dir / ADAPTER_FILENAME))
    assert copied.keys() == trained.keys() and all(copied[k].equal(trained[k]) for k in copied)
    assert (output_dir / "best" / "README.md").is_file()

    # best_config.json is a config raytuner train takes as it is, with the best trial's values.
    best_run = load_config(output_dir / sweep_results.BEST_CONFIG)
    assert best_run.training.optimization.learning_rate == pytest.approx(best.point["learning_rate"])
    assert best_run.training.flow.flow_schedule_shift == pytest.approx(best.point["flow_schedule_shift"])
    assert best_run.training.flow.flow_schedule_auto_shift is False
    assert best_run.lycoris is not None and best_run.lycoris.factor == best.point["factor"]
    assert best_run.training.ray.ray_num_workers == 1
    assert best_run.training.output_dir == output_dir / "best_run"


def test_every_trial_is_a_wandb_run_grouped_under_the_sweeps_name(interrupted_sweep: Sweep) -> None:
    for trial in interrupted_sweep.outcome.outcomes:
        (run,) = offline_runs(trial.output_dir / "logs")
        assert (run.name, run.group, run.job_type) == (f"test-sweep-{trial.trial_id}", "test-sweep", "trial")
        assert run.config["raytuner"] == {
            "train_run_name": f"test-sweep-{trial.trial_id}",
            "sweep": "test-sweep",
        }
        # The trial's own point is in its config, as trained.
        assert run.config["training"]["learning_rate"] == pytest.approx(trial.point["learning_rate"])
        steps = [step for step, _ in run.values("train/loss")]
        if trial.status == sweep_results.COMPLETED:
            assert steps == list(range(1, trial.steps + 1)) and run.exit_code == 0
        else:
            # Stopped early: Tune stops a trial after the report that fell behind, while its workers
            # go on training until Ray kills them, so the local file holds the steps flushed by then,
            # which may be a step or two past the last report.
            assert steps == list(range(1, len(steps) + 1)) and len(steps) <= STEPS


def test_asha_stops_the_trials_that_fall_behind_at_the_first_rung(interrupted_sweep: Sweep) -> None:
    trials = interrupted_sweep.outcome.outcomes
    stopped = [trial for trial in trials if trial.status == sweep_results.STOPPED]
    assert stopped, [(t.number, t.status, t.point) for t in trials]
    base_at_rung = dict(trials[0].curve)[2]
    for trial in stopped:
        assert 2 <= trial.steps < STEPS
        assert dict(trial.curve)[2] > base_at_rung  # behind the base config when it was stopped
    assert "stopped early" in (interrupted_sweep.outcome.output_dir / sweep_results.RESULTS_CSV).read_text()


def test_later_trials_are_tpe_suggestions_given_the_earlier_results(interrupted_sweep: Sweep) -> None:
    """Replaying the sweep's results into optuna's seeded TPE gives back the trials' points.

    Trial 2 was suggested before the interruption and trial 3 after it: the resumed sampler
    continues the same seeded sequence.
    """
    import optuna

    run = load_config(interrupted_sweep.config)
    sweep = read_sweep(interrupted_sweep.sweep, run)
    study = optuna.create_study(direction="minimize", sampler=sweep.sampler_instance())
    study.enqueue_trial(sweep.base_point)
    space = sweep.space()
    for trial in interrupted_sweep.outcome.outcomes:
        asked = study.ask(fixed_distributions=space)
        assert_same_points([asked.params], [trial.point])
        assert trial.metric is not None
        study.tell(asked, trial.metric)
    # Told other results, TPE proposes another last point: the suggestions follow the results.
    other = optuna.create_study(direction="minimize", sampler=sweep.sampler_instance())
    other.enqueue_trial(sweep.base_point)
    for trial in interrupted_sweep.outcome.outcomes[:2]:
        asked = other.ask(fixed_distributions=space)
        other.tell(asked, -trial.metric)
    assert other.ask(fixed_distributions=space).params != interrupted_sweep.outcome.outcomes[2].point


def test_the_cache_is_encoded_once_and_no_trial_encodes_anything(interrupted_sweep: Sweep) -> None:
    counts = interrupted_sweep.cache_counts
    assert len(counts) == 3
    for folder, (rows, encoded) in counts.items():
        # Every row was encoded exactly once, by the build before the first trial.
        assert rows > 0 and encoded == rows, folder


def _launch(config: Path, sweep: Path, log: Path, temp_dir: Path) -> subprocess.Popen[bytes]:
    env = {**clean_environment(), "RAY_TMPDIR": str(temp_dir), "WANDB_MODE": "offline"}
    handle = log.open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "raytuner.cli", "tune", "--config", str(config), "--sweep", str(sweep)],
        stdout=handle,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=config.parent,
    )


def _wait_for(
    condition, process: subprocess.Popen[bytes], log: Path, *, timeout: float = 400, poll: float = 1.0
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"raytuner tune exited {process.returncode} early:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out:\n{log.read_text()[-4000:]}")
        time.sleep(poll)


def _started_trials(trials_dir: Path) -> list[Path]:
    return [p.parent for p in sorted(trials_dir.glob("*/trial.json"), key=lambda p: p.stat().st_mtime)]


def _logged_steps(trial: Path) -> set[int]:
    path = trial / "logs" / "metrics.jsonl"
    return {int(entry["step"]) for entry in read_metrics(path)} if path.is_file() else set()


def test_an_interrupted_sweep_resumes_where_it_stopped(interrupted_sweep: Sweep) -> None:
    """Ctrl+C as trial 2 starts; the same sweep run again finishes it.

    Trial 2, run after the interruption, is stopped at ASHA's rung (step 2): it can only be stopped
    there with the base's result at that rung from before the interruption (alone at a rung, a
    trial is never behind). That trials 2 and 3 are the seeded TPE's suggestions given the results
    before each, on either side of the interruption, is the TPE test above.
    """
    interruption = interrupted_sweep.interruption
    assert not interruption.steps_logged_by_trial_2
    assert interruption.exit_code == 130, interruption.log[-4000:]
    assert "run the same command again to resume it" in interruption.log
    assert "(resumed)" not in interruption.log
    assert any("(resumed)" in line for line in interrupted_sweep.resumed_log), interrupted_sweep.resumed_log
    # The trials that had ended are not trained again.
    ended = interruption.ended
    assert [(trial / "logs" / "metrics.jsonl").read_text() for trial in ended] == interruption.histories
    assert (ended[0] / ADAPTER_FILENAME).stat().st_mtime_ns == interruption.adapter_time
    trials = interrupted_sweep.outcome.outcomes
    assert [trial.output_dir.name for trial in trials[:1]] == [trial.name for trial in ended]
    base, second = trials[0], trials[1]
    assert second.status == sweep_results.STOPPED and second.steps == 2, [(t.status, t.steps) for t in trials]
    assert dict(second.curve)[2] > dict(base.curve)[2]  # behind the base config at the rung
    rows = [
        row.split(",")
        for row in (interrupted_sweep.outcome.output_dir / sweep_results.RESULTS_CSV)
        .read_text()
        .splitlines()[1:]
    ]
    assert [row[1] for row in rows] == [trial.trial_id for trial in trials]
    assert [row[2] for row in rows] == [trial.status for trial in trials]
