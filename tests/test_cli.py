"""The ``raytuner`` command as users run it: exit codes, one-line errors, the offline demo."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from raytuner.cli import main
from raytuner.models.safety import is_tiny_checkpoint
from tests.ray_cluster import RayCluster

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_check_config_reports_a_bad_file_in_one_line_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "config.json"
    broken.write_text('{"model_family": "cosmos2image",}', encoding="utf-8")
    assert main(["check-config", "--config", str(broken)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "invalid JSON at line 1" in errors[0]


def test_check_config_prints_the_seed_config_resolved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    for folder in ("datasets/pseudo-camera-10k", "datasets/dreambooth-subject"):
        (tmp_path / folder).mkdir(parents=True)
    assert main(["check-config", "--config", str(REPO_ROOT / "configs/cosmos2image/config.json")]) == 0
    printed = capsys.readouterr().out
    assert "lycoris_config.json" in printed
    assert "cosmos2image" in printed


def test_tiny_model_command_writes_a_marked_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tiny-model", "--family", "omnigen", "--out", str(tmp_path / "tiny")]) == 0
    assert is_tiny_checkpoint(tmp_path / "tiny")
    assert main(["tiny-model", "--family", "flux", "--out", str(tmp_path / "flux")]) == 2
    assert "cosmos2image, omnigen" in capsys.readouterr().err


def test_demo_outside_the_repository_says_where_to_run_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["demo"]) == 2
    assert "run from the repository root or pass --configs DIR" in capsys.readouterr().err


@pytest.mark.slow
def test_offline_demo_runs_end_to_end(
    ray_cluster: RayCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`raytuner demo` as the README runs it, in a copy of the repository's configs.

    It runs on the session's Ray: the command uses a Ray it finds connected, as every command does;
    starting a local Ray of its own is what the sweep and Hub tests' ``raytuner`` subprocesses show.
    """
    shutil.copytree(REPO_ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO)
    code = main(["demo", "--steps", "4"])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    assert "eval loss (start -> end)" in printed.out
    for family in ("cosmos2image", "omnigen"):
        output = tmp_path / "output/demo" / family
        for adapter in (
            output / "pytorch_lora_weights.safetensors",
            output / "ema/pytorch_lora_weights.safetensors",
        ):
            with safe_open(str(adapter), framework="pt") as handle:
                assert any(key.startswith("lycoris_") for key in handle.keys())  # noqa: SIM118
                assert handle.metadata()["raytuner_family"] == family
        assert (output / "validation/step_4/validation-64x64.png").is_file()
        assert (output / "validation/grid.png").is_file()
        assert (output / "loss.png").is_file()
        assert (output / "README.md").is_file()
        # raytuner generate rendered the validation prompt with the trained adapter merged in.
        generated = json.loads((output / "generated/index.json").read_text())
        assert generated["settings"]["adapter_sha256"] and len(generated["images"]) == 2
        assert (output / "generated/grid.png").is_file()
        assert (tmp_path / "output/demo/cache/vae" / family / "raytuner_cache.json").is_file()
        recorded = json.loads((output / "config/config.json").read_text())
        assert recorded["model_family"] == family
        lines = [json.loads(line) for line in (output / "logs/metrics.jsonl").read_text().splitlines()]
        evals = [line["eval_loss"] for line in lines if line.get("kind") == "eval"]
        # Trained by 2 Ray Train workers; the held-out loss at the end is below the baseline.
        assert [line["step"] for line in lines if line.get("kind", "train") == "train"] == [1, 2, 3, 4]
        assert len(evals) == 2 and evals[1] < evals[0]
    assert any("2 worker(s)" in record.getMessage() for record in caplog.records)
    assert len(list((tmp_path / "output/demo/datasets/shapes").glob("*.png"))) == 8
    assert len(list((tmp_path / "output/demo/datasets/held-out").glob("*.png"))) == 4
