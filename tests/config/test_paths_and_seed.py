"""Path resolution order, and the seed drawn once, recorded and reused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from raytuner.config import SEED_FILE_NAME, ConfigError, load_config, record_seed


def _write_json(path: Path, content: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


@pytest.fixture
def project(tmp_path: Path, write_run: Any) -> Path:
    """A config folder ``project/conf`` whose files name each other as ``config/<name>``."""
    folder = tmp_path / "project" / "conf"
    config = {
        "model_family": "omnigen",
        "lora_type": "lycoris",
        "lycoris_config": "config/lycoris_config.json",
        "data_backend_config": "config/omnigen/multidatabackend.json",
        "max_train_steps": 1,
        "seed": 1,
    }
    _write_json(folder / "config.json", config)
    _write_json(
        folder / "multidatabackend.json", [{"id": "images", "type": "local", "instance_data_dir": "images"}]
    )
    _write_json(folder / "lycoris_config.json", {"algo": "lokr"})
    return folder


def test_relative_paths_prefer_the_working_directory(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1. relative to the working directory, as SimpleTuner reads it
    work = tmp_path / "work"
    in_cwd = _write_json(work / "config" / "lycoris_config.json", {"algo": "lokr", "factor": 2})
    monkeypatch.chdir(work)
    run = load_config(project / "config.json")
    assert run.sources["lycoris_config"] == in_cwd
    assert run.lycoris is not None and run.lycoris.factor == 2


def test_then_relative_to_the_naming_files_folder(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 2. relative to the folder of the file that names it
    beside = _write_json(project / "config" / "lycoris_config.json", {"algo": "lokr", "factor": 3})
    monkeypatch.chdir(tmp_path)
    run = load_config(project / "config.json")
    assert run.sources["lycoris_config"] == beside


def test_then_by_file_name_in_that_folder(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 3. the same file name in the folder of the naming file
    monkeypatch.chdir(tmp_path)
    run = load_config(project / "config.json")
    assert run.sources["lycoris_config"] == project / "lycoris_config.json"
    assert run.sources["data_backend_config"] == project / "multidatabackend.json"
    assert run.training.data.data_backend_config == project / "multidatabackend.json"


def test_dataset_and_output_paths(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (project / "images").mkdir()
    run = load_config(project / "config.json")
    # an existing folder beside multidatabackend.json is found; outputs stay relative to cwd
    assert run.datasets[0].instance_data_dir == project / "images"
    assert run.training.output_dir == tmp_path / "simpletuner-results"
    (tmp_path / "images").mkdir()
    assert load_config(project / "config.json").datasets[0].instance_data_dir == tmp_path / "images"


def test_missing_dataset_folder_resolves_against_cwd(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    run = load_config(project / "config.json")
    assert run.datasets[0].instance_data_dir == tmp_path / "images"
    text = run.datasets[1]
    assert text.cache_dir == str(tmp_path / "simpletuner-results" / "cache" / "text" / "omnigen")


def test_missing_file_lists_every_place_looked_at(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (project / "lycoris_config.json").unlink()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_config(project / "config.json")
    line = caught.value.problems[0]
    assert str(tmp_path / "config" / "lycoris_config.json") in line
    assert str(project / "config" / "lycoris_config.json") in line
    assert str(project / "lycoris_config.json") in line


def test_uri_cache_dirs_are_kept(write_run: Any) -> None:
    datasets = [
        {"id": "images", "type": "local", "instance_data_dir": "images", "cache_dir_vae": "s3://bucket/vae"},
        {"id": "text", "type": "local", "dataset_type": "text_embeds", "cache_dir": "s3://bucket/text"},
    ]
    run = load_config(write_run(datasets=datasets))
    assert (
        run.datasets[0].cache_dir_vae == "s3://bucket/vae" and run.datasets[1].cache_dir == "s3://bucket/text"
    )


def test_unset_seed_is_drawn_recorded_and_reused(write_run: Any, tmp_path: Path) -> None:
    config = {key: value for key, value in _base(write_run).items() if key != "seed"}
    config_path = write_run(config=config)
    first = load_config(config_path)
    assert first.seed_drawn and isinstance(first.seed, int) and 0 <= first.seed < 2**31
    assert not (tmp_path / "output").exists()  # loading never writes
    record_seed(first)
    recorded = tmp_path / "output" / SEED_FILE_NAME
    assert json.loads(recorded.read_text(encoding="utf-8")) == {"seed": first.seed}
    again = load_config(config_path)
    assert again.seed == first.seed and again.seed_drawn
    assert again.sources["seed"] == recorded


def test_explicit_seed_wins_over_a_recorded_one(write_run: Any, tmp_path: Path) -> None:
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / SEED_FILE_NAME).write_text('{"seed": 99}', encoding="utf-8")
    run = load_config(write_run())
    assert run.seed == 7 and not run.seed_drawn


def test_two_unrecorded_loads_draw_independently(write_run: Any) -> None:
    config_path = write_run(config={key: value for key, value in _base(write_run).items() if key != "seed"})
    seeds = {load_config(config_path).seed for _ in range(5)}
    assert len(seeds) > 1


def test_corrupt_seed_file_is_an_error(write_run: Any, tmp_path: Path) -> None:
    config_path = write_run(config={key: value for key, value in _base(write_run).items() if key != "seed"})
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / SEED_FILE_NAME).write_text("not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="not a recorded seed"):
        load_config(config_path)


def _base(write_run: Any) -> dict[str, Any]:
    path = write_run()
    return json.loads(path.read_text(encoding="utf-8"))
