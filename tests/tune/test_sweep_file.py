"""sweep.json is read and checked before Ray starts: the allow-lists, the ranges, the shift rules.

No Ray here: these are the checks ``raytuner tune`` makes before it starts anything, and the
helpers that turn a point of the search space into a trial's config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from raytuner.cli import main
from raytuner.config import ConfigError, load_config
from raytuner.config.fields import field_names
from raytuner.config.lycoris import LycorisConfig
from raytuner.config.training import TrainingConfig
from raytuner.train.settings import RayOverrides, resolve_settings
from raytuner.tune.command import concurrency, trial_resources, trials_that_fit
from raytuner.tune.space import CACHE_KEYS, SWEEPABLE_LYCORIS, SWEEPABLE_TRAINING, TRIAL_SETTINGS
from raytuner.tune.sweep import read_sweep
from tests.cache.helpers import image_dataset, text_dataset, write_run_files

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "configs"

GOOD_SWEEP: dict[str, Any] = {
    "num_samples": 4,
    "parameters": {
        "learning_rate": {"type": "loguniform", "low": 1e-3, "high": 1e-1},
        "factor": [2, 4, 8],
    },
    "fixed": {"max_train_steps": 6},
    "sampler": {"n_startup_trials": 2},
}
PRESET_LYCORIS = {
    "algo": "lokr",
    "linear_dim": 10000,
    "linear_alpha": 1,
    "factor": 16,
    "apply_preset": {
        "target_module": ["Attention", "FeedForward"],
        "module_algo_map": {"Attention": {"factor": 16}, "FeedForward": {"factor": 8}},
    },
}


def write_base(
    root: Path, *, family: str = "cosmos2image", lycoris: dict[str, Any] | None = None, **config: Any
) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    datasets = [image_dataset(root / "images", root / "cache/vae"), text_dataset(root / "cache/text")]
    files = write_run_files(
        root, Path("not-downloaded/tiny"), datasets, model_family=family, learning_rate=0.01, **config
    )
    if lycoris is not None:
        (root / "lycoris_config.json").write_text(json.dumps(lycoris))
    return files.config


def write_sweep(root: Path, sweep: dict[str, Any] | str) -> Path:
    path = root / "sweep.json"
    path.write_text(sweep if isinstance(sweep, str) else json.dumps(sweep))
    return path


def problems(root: Path, sweep: dict[str, Any] | str, **config: Any) -> str:
    run = load_config(write_base(root, **config))
    with pytest.raises(ConfigError) as raised:
        read_sweep(write_sweep(root, sweep), run)
    return "\n".join(raised.value.problems)


def with_parameters(**parameters: Any) -> dict[str, Any]:
    return {**GOOD_SWEEP, "parameters": parameters}


def test_the_allow_lists_name_real_fields_and_never_a_cache_key() -> None:
    assert field_names(TrainingConfig) >= SWEEPABLE_TRAINING | TRIAL_SETTINGS
    assert field_names(LycorisConfig) >= SWEEPABLE_LYCORIS
    assert not (SWEEPABLE_TRAINING | TRIAL_SETTINGS) & set(CACHE_KEYS)


def test_a_good_sweep_reads_with_the_base_config_as_its_first_point(tmp_path: Path) -> None:
    run = load_config(write_base(tmp_path))
    sweep = read_sweep(write_sweep(tmp_path, GOOD_SWEEP), run)
    assert sweep.base_point == {"learning_rate": 0.01, "factor": run.lycoris.factor}
    assert sweep.base.training.optimization.max_train_steps == 6  # "fixed" applied to every trial
    assert sweep.sampler == {"n_startup_trials": 2}
    assert sweep.metric == "loss"  # no eval dataset: the training loss, with a warning
    trial = sweep.trial_run({"learning_rate": 0.05, "factor": 8}, where="test")
    assert trial.training.optimization.learning_rate == 0.05 and trial.lycoris.factor == 8
    assert run.training.optimization.learning_rate == 0.01  # the base run is left as it was


def test_the_factor_rescales_every_preset_entry_and_keeps_the_base_exactly(tmp_path: Path) -> None:
    run = load_config(write_base(tmp_path, lycoris=PRESET_LYCORIS))
    sweep = read_sweep(write_sweep(tmp_path, with_parameters(factor=[4, 8, 16])), run)
    as_written = run.lycoris.apply_preset.module_algo_map
    assert sweep.trial_run({"factor": 16}, where="t").lycoris.apply_preset.module_algo_map == as_written
    halved = sweep.trial_run({"factor": 8}, where="t").lycoris
    assert halved.factor == 8 and halved.apply_preset.module_algo_map == {
        "Attention": {"factor": 8},
        "FeedForward": {"factor": 4},
    }


@pytest.mark.parametrize(
    ("sweep", "expected"),
    [
        (
            with_parameters(learning_rte={"type": "uniform", "low": 0.1, "high": 0.2}),
            "did you mean 'learning_rate'",
        ),
        ({**GOOD_SWEEP, "num_sample": 3}, "'num_sample' is not a sweep setting"),
        (with_parameters(resolution=[512, 1024]), "parameters 'resolution' changes the latents' size"),
        (with_parameters(crop_style=["center", "random"]), "'crop_style' is a multidatabackend.json key"),
        (with_parameters(validation_prompt=["a", "b"]), "changes the text cache"),
        (with_parameters(output_dir=["a", "b"]), "'output_dir' changes where the sweep writes"),
        (with_parameters(report_to=["tensorboard", "none"]), "'report_to' cannot be swept"),
        (
            with_parameters(learning_rate={"type": "loguniform", "low": 1e-2, "high": 1e-2}),
            "range [0.01, 0.01] is empty",
        ),
        (
            with_parameters(learning_rate={"type": "uniform", "low": 0.2, "high": 0.1}),
            "is empty: expected 'low' < 'high'",
        ),
        (
            with_parameters(learning_rate={"type": "loguniform", "low": "1e-3", "high": 0.1}),
            "'low' = '1e-3': expected a number",
        ),
        (with_parameters(learning_rate={"type": "loguniform", "low": 0, "high": 0.1}), "needs 'low' > 0"),
        (with_parameters(learning_rate={"type": "gaussian", "low": 0, "high": 1}), "'type' = 'gaussian'"),
        (with_parameters(factor=[]), "expected a non-empty list"),
        (with_parameters(factor=[4, 4]), "lists 4 twice"),
        (with_parameters(lr_warmup_steps={"type": "int", "low": 0.5, "high": 4}), "expected an integer"),
        (
            with_parameters(learning_rate={"type": "uniform", "low": -1.0, "high": 0.1}),
            "'learning_rate' = -1",
        ),
        (with_parameters(learning_rate={"type": "loguniform", "low": 0.02, "high": 0.1}), "value 0.01"),
        (
            with_parameters(lr_scheduler=["constant", "cosine_annealing"]),
            "'lr_scheduler' = 'cosine_annealing'",
        ),
        ({**GOOD_SWEEP, "parameters": {}}, "expected an object with at least one axis"),
        ({**GOOD_SWEEP, "fixed": {"learning_rate": 0.02}}, 'both in "parameters" and in "fixed"'),
        ({**GOOD_SWEEP, "sampler": {"n_startup": 2}}, "sampler 'n_startup' is not a TPESampler setting"),
        (
            {**GOOD_SWEEP, "early_stopping": {"reduction_factor": 1}},
            "early_stopping: 'reduction_factor' = 1: expected a number > 1",
        ),
        ({**GOOD_SWEEP, "resources_per_trial": {"workers": 2}}, "did you mean 'num_workers'"),
        (
            {**GOOD_SWEEP, "resources_per_trial": {"gpus_per_worker": -1}},
            "resources_per_trial: 'gpus_per_worker' = -1: expected a number >= 0",
        ),
        (
            {**GOOD_SWEEP, "early_stopping": {"grace_period": 0}},
            "early_stopping: 'grace_period' = 0: expected a number >= 1",
        ),
        ({**GOOD_SWEEP, "num_samples": 0}, "'num_samples' = 0: expected a number >= 1"),
        ("[1, 2]", "expected a JSON object"),
        ('{"parameters": {', "invalid JSON at line 1"),
    ],
    ids=lambda value: None if isinstance(value, dict | str) and len(str(value)) > 40 else str(value),
)
def test_a_bad_sweep_is_refused_with_the_key_and_the_fix(tmp_path: Path, sweep: Any, expected: str) -> None:
    text = problems(tmp_path, sweep)
    assert expected in text
    assert all(line.startswith(str(Path("sweep.json"))) or "sweep.json" in line for line in text.splitlines())


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    sweep = {**with_parameters(resolution=[512], factor=[]), "num_samples": -1}
    assert len(problems(tmp_path, sweep).splitlines()) == 3


def test_sweeping_the_shift_is_an_error_for_omnigen(tmp_path: Path) -> None:
    sweep = with_parameters(flow_schedule_shift={"type": "uniform", "low": 1.0, "high": 3.0})
    text = problems(tmp_path, sweep, family="omnigen")
    assert "parameters 'flow_schedule_shift': OmniGen" in text and "applies no shift" in text


def test_sweeping_the_shift_needs_auto_shift_off(tmp_path: Path) -> None:
    sweep = with_parameters(flow_schedule_shift={"type": "uniform", "low": 1.0, "high": 3.0})
    text = problems(tmp_path, sweep, flow_schedule_auto_shift=True)
    assert 'add "flow_schedule_auto_shift": false to "fixed"' in text
    run = load_config(write_base(tmp_path, flow_schedule_auto_shift=True, flow_schedule_shift=0.0))
    fixed = {**sweep, "fixed": {"flow_schedule_auto_shift": False}}
    read = read_sweep(write_sweep(tmp_path, fixed), run)
    # A static shift of 0 applies none, exactly as 1.0 does: that is the base config's point.
    assert read.base_point["flow_schedule_shift"] == 1.0
    assert read.base.training.flow.flow_schedule_auto_shift is False


def test_the_example_sweeps_read_against_their_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT)
    examples = {
        "cosmos2image": {"learning_rate", "factor", "flow_schedule_shift"},
        "omnigen": {"learning_rate", "factor", "lr_warmup_steps"},
        "demo/cosmos2image": {"learning_rate", "factor", "flow_schedule_shift"},
    }
    for folder, axes in examples.items():
        run = load_config(CONFIGS / folder / "config.json")
        sweep = read_sweep(CONFIGS / folder / "sweep.json", run)
        assert {parameter.key for parameter in sweep.parameters} == axes
        if "flow_schedule_shift" in axes:
            assert sweep.base.training.flow.flow_schedule_auto_shift is False
    seed = load_config(CONFIGS / "cosmos2image" / "config.json")
    assert (
        seed.training.flow.flow_schedule_auto_shift is True
    )  # the seed's own setting, turned off by the sweep


def test_concurrency_fits_every_worker_of_every_trial() -> None:
    assert trials_that_fit({"CPU": 8.0}, {"CPU": 3.0}) == 2
    assert trials_that_fit({"CPU": 64.0, "GPU": 8.0}, {"CPU": 3.0, "GPU": 2.0}) == 4
    assert trials_that_fit({"CPU": 64.0}, {"CPU": 3.0, "GPU": 2.0}) == 0


def test_max_concurrent_trials_is_derived_from_the_cluster(tmp_path: Path) -> None:
    run = load_config(write_base(tmp_path))
    sweep = read_sweep(write_sweep(tmp_path, {**GOOD_SWEEP, "num_samples": 10}), run)
    settings = resolve_settings(sweep.base, RayOverrides(num_workers=2, gpus_per_worker=1))
    assert trial_resources(settings) == {"CPU": 3.0, "GPU": 2.0}
    assert concurrency(sweep, settings, {"CPU": 32.0, "GPU": 8.0}) == 4
    assert concurrency(sweep, settings, {"CPU": 32.0}) == 1  # none fit now: one, for the autoscaler


def test_tune_refuses_a_bad_sweep_before_ray_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_base(tmp_path)
    sweep = write_sweep(tmp_path, with_parameters(resolution=[512, 1024]))
    assert main(["tune", "--config", str(config), "--sweep", str(sweep)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "'resolution'" in err[0]
    # Nothing written: the sweep's folder (its record, cache and Ray storage) comes after the checks.
    assert not (tmp_path / "output").exists()
