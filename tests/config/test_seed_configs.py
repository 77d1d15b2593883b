"""The example configs copied from the SimpleTuner quickstarts load unchanged, from any cwd."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from raytuner.cli import main
from raytuner.config import check_run, load_config
from raytuner.train.preflight import check_config_main

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "configs"

SEED_CONFIGS = [CONFIGS / "cosmos2image" / "config.json", CONFIGS / "omnigen" / "config.json"]
SEED_DATASET_DIRS = ["datasets/pseudo-camera-10k", "datasets/dreambooth-subject"]


@pytest.mark.parametrize("config_path", SEED_CONFIGS, ids=lambda path: path.parent.name)
@pytest.mark.parametrize("cwd", ["repo", "elsewhere"])
def test_seed_config_loads_from_any_cwd(
    config_path: Path, cwd: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO_ROOT if cwd == "repo" else tmp_path)
    run = load_config(config_path)
    folder = config_path.parent
    assert run.sources["config"] == config_path.resolve()
    assert run.sources["data_backend_config"] == folder / "multidatabackend.json"
    assert run.sources["lycoris_config"] == folder / "lycoris_config.json"
    assert run.training.model.model_family == folder.name
    assert run.training.model.lora_type == "lycoris"
    assert run.lycoris is not None and run.lycoris.algo == "lokr"
    assert run.lycoris.apply_preset is not None and "Attention" in run.lycoris.apply_preset.target_module
    assert run.training.seed == 42 and not run.seed_drawn
    # Outputs and dataset folders resolve against the working directory, as in SimpleTuner.
    assert run.training.output_dir.is_relative_to(Path.cwd())
    text_embeds = [dataset for dataset in run.datasets if dataset.dataset_type == "text_embeds"]
    assert len(text_embeds) == 1 and text_embeds[0].default


def test_cosmos_seed_values_are_typed() -> None:
    run = load_config(CONFIGS / "cosmos2image" / "config.json")
    training = run.training
    assert training.model.model_flavour == "2b"
    assert training.optimization.learning_rate == pytest.approx(6e-5)
    assert training.flow.flow_schedule_shift == 0.0 and training.flow.flow_schedule_auto_shift is True
    assert training.optimization.use_ema is True and training.model.quantize_via == "cpu"
    assert training.validation.validation_prompt_library is False
    assert run.lycoris is not None and run.lycoris.bypass_mode and run.lycoris.full_matrix
    assert run.lycoris.apply_preset is not None
    assert run.lycoris.apply_preset.module_algo_map == {"Attention": {"factor": 4}}
    first = run.datasets[0]
    assert first.is_regularisation_data and first.crop_style == "center" and first.repeats == 0


def test_omnigen_seed_string_values_are_coerced() -> None:
    run = load_config(CONFIGS / "omnigen" / "config.json")
    training = run.training
    assert training.model.model_flavour == "v1"
    assert training.optimization.learning_rate == pytest.approx(4e-5)
    assert training.memory.gradient_checkpointing is True
    assert training.validation.validation_num_inference_steps == 20
    assert training.validation.validation_guidance_rescale == 0.0
    assert any("validation_torch_compile" in warning for warning in run.warnings)
    assert run.lycoris is not None and run.lycoris.factor == 16
    assert run.lycoris.apply_preset is not None
    assert run.lycoris.apply_preset.module_algo_map["FeedForward"] == {"factor": 8}


def test_omnigen_eval_dataloader_example_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = json.loads((CONFIGS / "omnigen" / "config.json").read_text(encoding="utf-8"))
    config["data_backend_config"] = str(CONFIGS / "omnigen" / "multidatabackend-eval.json")
    config["lycoris_config"] = str(CONFIGS / "omnigen" / "lycoris_config.json")
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    run = load_config(tmp_path / "config.json")
    by_type = {dataset.dataset_type: dataset for dataset in run.datasets}
    assert set(by_type) == {"image", "eval", "text_embeds"}
    assert by_type["eval"].instance_data_dir == Path("/datasets/test_datasets/squares")
    assert by_type["image"].maximum_image_size == 1536


@pytest.mark.parametrize("config_path", SEED_CONFIGS, ids=lambda path: path.parent.name)
def test_check_config_passes_where_dataset_folders_exist(
    config_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for folder in SEED_DATASET_DIRS:
        (tmp_path / folder).mkdir(parents=True)  # empty folders pass; the cache step counts images
    monkeypatch.chdir(tmp_path)
    assert check_config_main(str(config_path)) == 0
    out = capsys.readouterr().out
    assert str(config_path.parent / "multidatabackend.json") in out
    assert str(tmp_path / "datasets" / "pseudo-camera-10k") in out


@pytest.mark.parametrize("config_path", SEED_CONFIGS, ids=lambda path: path.parent.name)
def test_check_config_names_missing_dataset_folder(
    config_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "datasets" / "pseudo-camera-10k").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert main(["check-config", "--config", str(config_path)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert errors and all("datasets/dreambooth-subject" in line for line in errors)
    assert all("does not exist" in line for line in errors)
    run = load_config(config_path)
    assert check_run(run) == [line.removeprefix("error: ") for line in errors]


@pytest.mark.slow  # a raytuner process: seconds of imports
def test_check_config_console_script_exits_2_naming_the_missing_folder(tmp_path: Path) -> None:
    # The installed `raytuner` entry point, as `ray job submit -- raytuner ...` runs it.
    command = [
        str(Path(sys.executable).with_name("raytuner")),
        "check-config",
        "--config",
        str(SEED_CONFIGS[1]),
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert "resolved config:" in done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors and "pseudo-camera-10k" in errors[0]
    assert "Traceback" not in done.stderr
