"""check-config refuses exactly what train, tune and cache refuse before Ray starts, in the same words.

Every bad-config case of the suite (``tests/config/bad_cases.py``) runs through the ``raytuner``
command in-process (``raytuner.cli.main``, which prints the errors the commands raise); none of
them reaches Ray.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from raytuner.cli import main
from raytuner.config import load_config
from raytuner.train.preflight import SNAPSHOT_FILE, check_config_main
from raytuner.train.settings import resolve_settings, run_name
from tests.config.bad_cases import BAD_CASES, PREFLIGHT_CASES, TRAIN_ONLY

CASES = BAD_CASES + PREFLIGHT_CASES


def _write(write_run: Any, files: dict[str, Any]) -> Path:
    files = dict(files)
    earlier_run = files.pop("earlier_run", False)
    config_path = write_run(**files)
    if earlier_run:
        # What Ray Train leaves under the storage path once a run has reported a checkpoint.
        run = load_config(config_path)
        folder = Path(resolve_settings(run).storage_path) / run_name(run)
        folder.mkdir(parents=True)
        (folder / SNAPSHOT_FILE).write_text("{}", encoding="utf-8")
    return config_path


def _errors(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize(("case", "files", "fragments"), CASES, ids=[case[0] for case in CASES])
def test_check_config_and_train_refuse_a_bad_config_with_the_same_lines(
    case: str,
    files: dict[str, Any],
    fragments: list[str],
    write_run: Any,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    config_path = _write(write_run, files)
    assert main(["check-config", "--config", str(config_path)]) == 2
    checked = _errors(capsys)
    assert any(all(fragment in line for fragment in fragments) for line in checked), checked

    # Refused before Ray starts: check-config said 2.
    assert main(["train", "--config", str(config_path)]) == 2
    assert _errors(capsys) == checked

    if case in TRAIN_ONLY:
        return
    assert main(["cache", "--config", str(config_path)]) == 2
    assert _errors(capsys) == checked
    sweep = tmp_path / "sweep.json"
    sweep.write_text(
        json.dumps(
            {
                "metric": "loss",
                "parameters": {"caption_dropout_probability": {"type": "uniform", "low": 0.0, "high": 0.5}},
            }
        ),
        encoding="utf-8",
    )
    assert main(["tune", "--config", str(config_path), "--sweep", str(sweep)]) == 2
    assert _errors(capsys) == checked


def test_a_checked_config_passes_every_command_s_pre_flight(
    write_run: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The other side: what check-config passes, the commands' pre-flight passes too."""
    from raytuner.train.preflight import preflight

    config_path = write_run(config_updates={"validation_step_interval": 0, "validation_prompt": "a cat"})
    assert check_config_main(str(config_path)) == 0
    run = load_config(config_path)
    assert run.training.validation.validation_step_interval == 0
    for command in ("train", "tune", "cache"):
        assert preflight(run, resolve_settings(run), command=command) == []  # type: ignore[arg-type]
