"""Without --config, the config file is found as SimpleTuner finds it, and the commands say which."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from raytuner.cli import main
from raytuner.config import ConfigError
from raytuner.config.search import find_config
from tests.config.helpers import clear_config_variables


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory, with none of the choosing variables set."""
    monkeypatch.chdir(tmp_path)
    clear_config_variables(monkeypatch)
    return tmp_path


def _touch(path: Path, text: str = "{}") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path.resolve()


def test_config_json_then_toml_then_env_in_config(here: Path) -> None:
    env = _touch(here / "config" / "config.env", "export LEARNING_RATE=1e-4\n")
    assert find_config().path == env
    toml = _touch(here / "config" / "config.toml", "")
    assert find_config().path == toml
    json = _touch(here / "config" / "config.json")
    found = find_config()
    assert found.path == json
    assert found.describe() == (
        "config: config/config.json (found as SimpleTuner finds it: the first of config.json, "
        "config.toml, config.env in config/)"
    )


def test_the_backend_variables_choose_the_format(here: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _touch(here / "config" / "config.json")
    toml = _touch(here / "config" / "config.toml", "")
    monkeypatch.setenv("CONFIG_TYPE", "toml")
    assert find_config().path == toml
    monkeypatch.setenv("CONFIG_BACKEND", "JSON")  # CONFIG_BACKEND before CONFIG_TYPE
    assert find_config().path == here / "config" / "config.json"
    monkeypatch.setenv("SIMPLETUNER_CONFIG_BACKEND", "cmd")
    with pytest.raises(ConfigError, match=r"SIMPLETUNER_CONFIG_BACKEND='cmd': expected json, toml or env"):
        find_config()


def test_config_env_is_sourced_first_and_can_choose(here: Path) -> None:
    _touch(here / "config" / "config.json")
    toml = _touch(here / "config" / "config.toml", "")
    _touch(here / "config" / "config.env", "export CONFIG_TYPE=toml\n")
    assert find_config().path == toml


def test_an_environment_reads_config_env_folder(here: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _touch(here / "config" / "config.json")
    pets = _touch(here / "config" / "pets" / "config.json")
    monkeypatch.setenv("ENV", "pets")
    found = find_config()
    assert found.path == pets and "ENV=pets" in found.reason
    monkeypatch.setenv("SIMPLETUNER_ENV", "default")  # SIMPLETUNER_ENV before ENV; default is none
    assert find_config().path == here / "config" / "config.json"
    monkeypatch.setenv("SIMPLETUNER_ENV", "pets")
    toml = _touch(here / "config" / "pets" / "config.toml", "")
    monkeypatch.setenv("CONFIG_BACKEND", "toml")
    assert find_config().path == toml


def test_config_path_names_a_folder_or_a_file_without_suffix(
    here: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _touch(here / "config" / "config.json")
    elsewhere = _touch(here / "runs" / "a" / "config.json")
    monkeypatch.setenv("CONFIG_PATH", str(here / "runs" / "a"))
    assert find_config().path == elsewhere
    named = _touch(here / "runs" / "b.json")
    monkeypatch.setenv("CONFIG_PATH", "runs/b")
    found = find_config()
    assert found.path == named and "CONFIG_PATH=runs/b" in found.reason


def test_nothing_found_names_every_place_looked(here: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENV", "pets")
    with pytest.raises(ConfigError) as caught:
        find_config()
    (line,) = caught.value.problems
    assert line.startswith(
        "no config file found (format json, looked at: pets/config.json, config/pets/config.json; "
    )


@pytest.mark.parametrize(
    "command", [["check-config"], ["cache"], ["train"], ["tune", "--sweep", "sweep.json"]]
)
def test_every_config_command_runs_without_config_and_prints_the_file(
    command: list[str], write_run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    clear_config_variables(monkeypatch)
    config_json = write_run(config_updates={"model_family": "flux"})  # stops at loading, before Ray
    (tmp_path / "config").mkdir()
    config_json.rename(tmp_path / "config" / "config.json")
    assert main(command) == 2
    output = capsys.readouterr()
    assert output.out.splitlines()[0] == (
        "config: config/config.json (found as SimpleTuner finds it: the first of config.json, "
        "config.toml, config.env in config/)"
    )
    assert output.err.splitlines() == [
        "error: config/config.json: model_family 'flux' is not supported by raytuner "
        "(supported: cosmos2image, omnigen)"
    ]
