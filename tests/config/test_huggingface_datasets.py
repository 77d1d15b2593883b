"""type huggingface datasets in multidatabackend.json: their keys, block, defaults and refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from raytuner.cli import main
from raytuner.config import load_config
from raytuner.config.errors import ConfigError
from tests.config.helpers import BASE_DATASETS, WriteRun
from tests.hub_datasets import save_hub_dataset
from tests.simpletuner_examples import OMNIGEN_LOKR, lay_out_example

TEXT = BASE_DATASETS[1]
# The image dataset of SimpleTuner's cosmos2image.lycoris-lokr example (its dataloader,
# multidatabackend-small-dreambooth-512px.json), and omnigen.lycoris-lokr's (reference-512px).
COSMOS_EXAMPLE: dict[str, Any] = {
    "id": "dreambooth-512",
    "type": "huggingface",
    "dataset_name": "RareConcepts/Domokun",
    "crop": True,
    "crop_style": "random",
    "crop_aspect": "square",
    "minimum_image_size": 128,
    "maximum_image_size": 512,
    "target_downsample_size": 512,
    "resolution": 512,
    "resolution_type": "pixel",
    "metadata_backend": "huggingface",
    "caption_strategy": "instanceprompt",
    "instance_prompt": "🟫",
    "cache_dir_vae": "cache/vae/cosmos/dreambooth-512",
}
OMNIGEN_EXAMPLE: dict[str, Any] = {
    "id": "reference-512",
    "type": "huggingface",
    "dataset_name": "keras-dreambooth/minercraft",
    "crop": False,
    "crop_style": "random",
    "crop_aspect": "square",
    "minimum_image_size": 128,
    "resolution": 512,
    "maximum_image_size": 512,
    "target_downsample_size": 512,
    "resolution_type": "pixel_area",
    "metadata_backend": "huggingface",
    "caption_strategy": "instanceprompt",
    "instance_prompt": "minecraft",
    "cache_dir_vae": "cache/vae/omnigen/reference-512",
    "conditioning": {
        "type": "superresolution",
        "conditioning_type": "reference_strict",
        "captions": ["minecraft"],
    },
}


def _hub(**keys: Any) -> dict[str, Any]:
    return {"id": "hub", "type": "huggingface", "dataset_name": "user/pictures", **keys}


def _image_dataset(write_run: WriteRun, entry: dict[str, Any], **config: Any) -> Any:
    run = load_config(write_run(datasets=[entry, TEXT], config_updates=config or None, make_images=False))
    return next(dataset for dataset in run.datasets if dataset.id == entry["id"]), run


def test_the_huggingface_keys_are_read_from_the_entry_and_its_block(
    write_run: WriteRun, tmp_path: Path
) -> None:
    dataset, run = _image_dataset(write_run, _hub())
    # SimpleTuner's defaults for a huggingface dataset.
    assert (dataset.metadata_backend, dataset.caption_strategy) == ("huggingface", "huggingface")
    assert (dataset.dataset_name, dataset.split, dataset.revision, dataset.image_column) == (
        "user/pictures",
        "train",
        None,
        "image",
    )
    assert dataset.caption_columns == ("caption",)
    block = {
        "dataset_name": "ignored/at-the-top",
        "split": "validation",
        "revision": "v2",
        "image_column": "jpg",
        "caption_column": ["short", "meta.long"],
        "fallback_caption_column": "alt",
        "description_column": "about",
        "streaming": False,
        "num_proc": 4,
    }
    dataset, run = _image_dataset(write_run, _hub(huggingface=block))
    assert (dataset.dataset_name, dataset.split, dataset.revision, dataset.image_column) == (
        "user/pictures",
        "validation",
        "v2",
        "jpg",
    )
    assert (dataset.caption_columns, dataset.fallback_caption_column, dataset.description_column) == (
        ("short", "meta.long"),
        "alt",
        "about",
    )
    assert not [warning for warning in run.warnings if "huggingface" in warning]
    # A folder name becomes an absolute path, so every node reads the same folder.
    save_hub_dataset(tmp_path / "saved", 1)
    dataset, _ = _image_dataset(write_run, _hub(dataset_name="saved"))
    assert dataset.dataset_name == str((tmp_path / "saved").resolve())


def test_what_is_not_implemented_is_named(write_run: WriteRun) -> None:
    block = {
        "filter_func": {"min_width": 512},
        "composite_image_config": {"enabled": True},
        "streaming": True,
    }
    _, run = _image_dataset(write_run, _hub(huggingface=block, split_composite_images=True))
    warned = " ".join(run.warnings)
    for key in (
        "huggingface.filter_func",
        "huggingface.composite_image_config",
        "huggingface.streaming",
        "split_composite_images",
    ):
        assert f"not yet supported: {key}" in warned, key
    _, run = _image_dataset(write_run, _hub(huggingface={"colour_column": "x"}))
    assert any("unknown key 'huggingface.colour_column'" in warning for warning in run.warnings)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"id": "hub", "type": "huggingface"},
            "'dataset_name' is required for a dataset of type huggingface",
        ),
        (_hub(metadata_backend="discovery"), "'metadata_backend' = 'discovery'"),
        (_hub(caption_strategy="textfile"), "'caption_strategy' = 'textfile'"),
        (_hub(dataset_type="conditioning", conditioning_type="mask"), "'type' = 'huggingface'"),
        (_hub(huggingface={"caption_column": 3}), "'huggingface.caption_column'"),
        (_hub(huggingface="user/pictures"), "'huggingface' = 'user/pictures'"),
        (_hub(dataset_name="./missing"), "'dataset_name' = './missing'"),
        (_hub(dataset_name="/no/such/folder", revision="main"), "'revision' = 'main'"),
        (
            {"id": "hub", "type": "local", "instance_data_dir": "images", "dataset_name": "user/pictures"},
            "'dataset_name' is read only for a dataset of type huggingface",
        ),
        (
            {"id": "hub", "type": "local", "instance_data_dir": "images", "split": "test"},
            "'split' is read only for a dataset of type huggingface",
        ),
        (
            {"id": "hub", "type": "local", "instance_data_dir": "images", "huggingface": {}},
            "'huggingface' is read only for a dataset of type huggingface",
        ),
        (
            {"id": "hub", "type": "local", "instance_data_dir": "images", "caption_strategy": "huggingface"},
            "'caption_strategy' = 'huggingface'",
        ),
    ],
    ids=str,
)
def test_a_bad_huggingface_dataset_is_one_clear_line(
    write_run: WriteRun, entry: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(write_run(datasets=[entry, TEXT]))
    assert message in str(raised.value)


@pytest.mark.parametrize("example", [COSMOS_EXAMPLE, OMNIGEN_EXAMPLE], ids=lambda entry: entry["id"])
def test_the_simpletuner_examples_dataloaders_are_accepted(
    write_run: WriteRun, tmp_path: Path, example: dict[str, Any]
) -> None:
    save_hub_dataset(tmp_path / "saved", 1)
    dataset, run = _image_dataset(write_run, {**example, "dataset_name": "saved"})
    assert dataset.type == "huggingface" and dataset.caption_strategy == "instanceprompt"
    assert dataset.cache_dir_vae == str(tmp_path / example["cache_dir_vae"])
    unsupported = [warning for warning in run.warnings if "not yet supported" in warning]
    # omnigen's reference conditioning is its own missing feature, named, not this backend's.
    assert len(unsupported) == (1 if "conditioning" in example else 0)
    assert all("conditioning" in warning for warning in unsupported)


def test_simpletuners_omnigen_example_passes_check_config(
    tmp_path: Path,
    tiny_omnigen_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """omnigen.lycoris-lokr as shipped, with its dataloader and its dataset saved under its hub id."""
    monkeypatch.chdir(tmp_path)
    config = lay_out_example(tmp_path, OMNIGEN_LOKR, model=tiny_omnigen_dir)
    assert main(["check-config", "--config", str(config.relative_to(tmp_path))]) == 0
    assert "ok: config/examples/omnigen.lycoris-lokr/config.json" in capsys.readouterr().out
    run = load_config(config)
    (dataset,) = [d for d in run.enabled_datasets if d.id == "reference-512"]
    assert dataset.dataset_name == str(tmp_path / "keras-dreambooth/minercraft")
    assert dataset.cache_dir_vae == str(tmp_path / "cache/vae/omnigen/reference-512")
    assert run.training.model.base_model_precision == "int8-quanto"
    assert run.lycoris is not None and run.lycoris.algo == "lokr"
    assert not [w for w in run.warnings if "unknown key" in w]
