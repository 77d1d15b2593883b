"""Bad cache inputs: one clear line and exit code 2, before Ray starts, and nothing cached is lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from raytuner.cache.format import CacheError, read_manifest
from raytuner.cache.identity import component_identity
from raytuner.cache.settings import cache_setting_problems
from raytuner.cli import main
from raytuner.config import ConfigError, load_config
from raytuner.data.discovery import DatasetError, check_visible
from raytuner.storage import Location
from tests.cache.helpers import draw_images, image_dataset, text_dataset, write_run_files


def _cache_command(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).with_name("raytuner")), "cache", "--config", str(config)],
        cwd=config.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.slow  # a raytuner process: seconds of imports
def test_a_bad_cache_setting_is_one_line_and_exit_2_before_ray_starts(
    tmp_path: Path, tiny_cosmos_dir: Path
) -> None:
    draw_images(tmp_path / "images", [(64, 64)])
    files = write_run_files(
        tmp_path,
        tiny_cosmos_dir,
        [image_dataset(tmp_path / "images", tmp_path / "cache"), text_dataset(tmp_path / "text")],
        aspect_bucket_alignment=8,
    )
    finished = _cache_command(files.config)
    assert finished.returncode == 2
    errors = [line for line in finished.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: config.json: 'aspect_bucket_alignment' = 8: expected a multiple of 16 for cosmos2image "
        "(VAE downsampling x patch size); set it to 16 or 64"
    ]
    assert "Traceback" not in finished.stderr and "Started a local Ray" not in finished.stderr


@pytest.mark.slow  # a raytuner process: seconds of imports
def test_a_missing_config_or_dataset_folder_is_exit_2(tmp_path: Path, tiny_cosmos_dir: Path) -> None:
    assert main(["cache", "--config", str(tmp_path / "nowhere.json")]) == 2
    files = write_run_files(
        tmp_path,
        tiny_cosmos_dir,
        [image_dataset(tmp_path / "missing", tmp_path / "cache"), text_dataset(tmp_path / "text")],
    )
    finished = _cache_command(files.config)
    assert (
        finished.returncode == 2
        and "'instance_data_dir'" in finished.stderr
        and "folder does not exist" in finished.stderr
    )
    assert "Traceback" not in finished.stderr


def test_two_datasets_cannot_share_a_cache_folder(
    tmp_path: Path, tiny_cosmos_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    files = write_run_files(
        tmp_path,
        tiny_cosmos_dir,
        [
            image_dataset(tmp_path / "images", tmp_path / "cache", id="one"),
            image_dataset(tmp_path / "images", tmp_path / "cache", id="two"),
            text_dataset(tmp_path / "text"),
        ],
    )
    with pytest.raises(ConfigError) as caught:
        load_config(files.config)
    assert caught.value.problems == (
        f"multidatabackend.json: dataset 'two': 'cache_dir_vae' = '{tmp_path / 'cache'}' is already the cache "
        "folder of dataset 'one'; give every dataset its own cache folder",
    )


def test_an_unset_cache_dir_vae_defaults_below_output_dir(tmp_path: Path, tiny_cosmos_dir: Path) -> None:
    (tmp_path / "images").mkdir()
    dataset = image_dataset(tmp_path / "images", "unused")
    del dataset["cache_dir_vae"]
    files = write_run_files(tmp_path, tiny_cosmos_dir, [dataset, text_dataset(tmp_path / "text")])
    run = load_config(files.config)
    assert run.datasets[0].cache_dir_vae == str(
        tmp_path / "output" / "cache" / "vae" / "cosmos2image" / "shapes"
    )


def test_a_node_that_cannot_see_a_local_dataset_says_so(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as caught:
        check_visible("shapes", Location(uri=str(tmp_path / "not-mounted")))
    message = str(caught.value)
    assert message.startswith("dataset 'shapes': node ") and "cannot read" in message
    assert "shared filesystem" in message and "object storage" in message
    check_visible("shapes", Location(uri=str(tmp_path)))


def test_a_hub_model_that_cannot_be_reached_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CacheError) as caught:
        component_identity("nvidia/Cosmos-Predict2-2B-Text2Image", ["vae"], revision=None, settings={})
    assert str(caught.value).startswith(
        "pretrained_model_name_or_path 'nvidia/Cosmos-Predict2-2B-Text2Image': cannot read"
    )
    assert "point it at a local copy" in str(caught.value)


def test_a_damaged_manifest_is_refused_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "raytuner_cache.json").write_text("{not json")
    with pytest.raises(CacheError, match="not a raytuner cache manifest"):
        read_manifest(Location(uri=str(tmp_path)))
    assert (tmp_path / "raytuner_cache.json").read_text() == "{not json"
    (tmp_path / "raytuner_cache.json").write_text(json.dumps({"format": "raytuner.cache", "version": 99}))
    with pytest.raises(CacheError, match="cache format version 99"):
        read_manifest(Location(uri=str(tmp_path)))


def test_skip_file_discovery_takes_only_phase_names(
    tmp_path: Path, tiny_cosmos_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    dataset = image_dataset(tmp_path / "images", tmp_path / "cache", skip_file_discovery="vea")
    run = write_run_files(tmp_path, tiny_cosmos_dir, [dataset, text_dataset(tmp_path / "text")]).load()
    assert cache_setting_problems(run) == [
        "multidatabackend.json: dataset 'shapes': 'skip_file_discovery' = 'vea': 'vea' is not a phase; "
        "expected words from: vae, aspect, text"
    ]
