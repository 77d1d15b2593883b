"""``{model_family}``, ``{output_dir}``, ``{id}`` and ``{env:NAME}`` in multidatabackend.json values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from raytuner.config import load_config
from raytuner.config.errors import ConfigError
from raytuner.config.placeholders import fill_dataset_placeholders
from tests.config.helpers import BASE_DATASETS, WriteRun

TEXT = {
    "id": "text",
    "type": "local",
    "dataset_type": "text_embeds",
    "default": True,
    "cache_dir": "cache/text/{model_family}",
}


def _images(**keys: Any) -> dict[str, Any]:
    return {"id": "images", "type": "local", "instance_data_dir": "images", **keys}


def test_cache_folders_are_filled_as_simpletuner_fills_them(write_run: WriteRun, tmp_path: Path) -> None:
    images = _images(cache_dir_vae="{output_dir}/cache/vae/{model_family}/{id}")
    run = load_config(write_run(datasets=[images, TEXT]))
    by_id = {dataset.id: dataset for dataset in run.datasets}
    output = tmp_path.resolve() / "output"
    assert by_id["images"].cache_dir_vae == str(output / "cache" / "vae" / "cosmos2image" / "images")
    assert by_id["text"].cache_dir == str(tmp_path.resolve() / "cache" / "text" / "cosmos2image")


def test_an_environment_variable_fills_a_value(
    write_run: WriteRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAYTUNER_TEST_DATA", "images")
    run = load_config(write_run(datasets=[_images(instance_data_dir="{env:RAYTUNER_TEST_DATA}"), TEXT]))
    assert run.datasets[0].instance_data_dir == tmp_path.resolve() / "images"


def test_an_unset_environment_variable_is_empty_and_warned_about() -> None:
    filled = fill_dataset_placeholders(
        [{"id": "a", "aws_data_prefix": "data/{env:UNSET_NAME}"}],
        model_family="omnigen",
        output_dir="out",
        where="multidatabackend.json",
        environ={},
    )
    assert filled.entries == [{"id": "a", "aws_data_prefix": "data/"}]
    assert not filled.problems
    assert "UNSET_NAME is not set" in filled.warnings[0]


def test_nested_values_are_filled_and_keys_and_other_types_left_alone() -> None:
    entry = {"id": "a", "parquet": {"path": "{id}.parquet", "{id}": 3}, "list": ["{model_family}", 2]}
    filled = fill_dataset_placeholders(
        [entry], model_family="omnigen", output_dir="out", where="multidatabackend.json", environ={}
    )
    assert filled.entries == [
        {"id": "a", "parquet": {"path": "a.parquet", "{id}": 3}, "list": ["omnigen", 2]}
    ]


def test_an_unknown_placeholder_is_one_line_naming_it(write_run: WriteRun) -> None:
    images = _images(cache_dir_vae="cache/{modelfamily}/{id}")
    with pytest.raises(ConfigError) as caught:
        load_config(write_run(datasets=[images, TEXT]))
    [line] = [p for p in caught.value.problems if "placeholder" in p]
    assert line.startswith(
        "multidatabackend.json: dataset 'images': 'cache_dir_vae' = 'cache/{modelfamily}/{id}'"
    )
    assert "unknown placeholder {modelfamily}" in line
    assert "{model_family}, {output_dir}, {id}, {env:NAME}" in line
    assert "\n" not in line


def test_a_secret_with_an_unknown_placeholder_stays_hidden() -> None:
    filled = fill_dataset_placeholders(
        [{"id": "a", "aws_secret_access_key": "{secret}"}],
        model_family="omnigen",
        output_dir="out",
        where="multidatabackend.json",
        environ={},
    )
    [line] = filled.problems
    assert "unknown placeholder {secret}" in line
    assert "= '{secret}'" not in line


def test_braces_in_a_prompt_are_the_users_words(write_run: WriteRun) -> None:
    datasets = [
        {**BASE_DATASETS[0], "caption_strategy": "instanceprompt", "instance_prompt": "a {red} car by {id}"},
        BASE_DATASETS[1],
    ]
    run = load_config(write_run(datasets=datasets))
    assert run.datasets[0].instance_prompt == "a {red} car by images"


def test_env_placeholders_in_config_values_are_the_environment(
    write_run: WriteRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAYTUNER_TEST_PROJECT", "lokr-sweeps")
    monkeypatch.delenv("RAYTUNER_TEST_UNSET", raising=False)
    config = write_run(
        config_updates={
            "tracker_project_name": "{env:RAYTUNER_TEST_PROJECT}",
            "tracker_run_name": "run{env:RAYTUNER_TEST_UNSET}-{kept}",
        }
    )
    tracking = load_config(config).training.tracking
    assert (tracking.tracker_project_name, tracking.tracker_run_name) == ("lokr-sweeps", "run-{kept}")
