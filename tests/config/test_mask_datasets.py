"""Masked loss in multidatabackend.json: a conditioning dataset of masks linked by an image dataset."""

from __future__ import annotations

from typing import Any

import pytest

from raytuner.batches.reader import training_datasets
from raytuner.cache.settings import image_datasets, mask_dataset
from raytuner.config import load_config
from raytuner.config.errors import ConfigError
from raytuner.evaluate.eval_loss import eval_datasets
from tests.config.helpers import WriteRun

TEXT = {
    "id": "text",
    "type": "local",
    "dataset_type": "text_embeds",
    "default": True,
    "cache_dir": "cache/text",
}


def _images(**keys: Any) -> dict[str, Any]:
    return {
        "id": "images",
        "type": "local",
        "instance_data_dir": "images",
        "caption_strategy": "filename",
        **keys,
    }


def _masks(**keys: Any) -> dict[str, Any]:
    return {
        "id": "masks",
        "type": "local",
        "dataset_type": "conditioning",
        "conditioning_type": "mask",
        "instance_data_dir": "images",
        **keys,
    }


def _problems(write_run: WriteRun, datasets: list[dict[str, Any]]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(write_run(datasets=datasets))
    return list(caught.value.problems)


def test_a_mask_dataset_linked_by_an_image_dataset_is_read_with_it(write_run: WriteRun) -> None:
    run = load_config(write_run(datasets=[_images(conditioning_data="masks"), _masks(), TEXT]))
    by_id = {dataset.id: dataset for dataset in run.datasets}
    masks = by_id["masks"]
    assert masks.is_mask and masks.needs_images and not masks.encodes_latents
    # Cached beside the image dataset's latents: no latent cache folder of its own.
    assert masks.cache_dir_vae is None
    assert [d.id for d in image_datasets(run)] == ["images"]
    assert [d.id for d in training_datasets(run)] == ["images"]
    assert eval_datasets(run) == []
    assert mask_dataset(run, by_id["images"]) is masks


def test_conditioning_data_may_be_a_list_of_one_id(write_run: WriteRun) -> None:
    run = load_config(write_run(datasets=[_images(conditioning_data=["masks"]), _masks(), TEXT]))
    assert next(d for d in run.datasets if d.id == "images").conditioning_data == "masks"


@pytest.mark.parametrize(
    ("datasets", "expected"),
    [
        pytest.param(
            [_images(conditioning_data="maks"), _masks(), TEXT],
            "dataset 'images': 'conditioning_data' = 'maks': expected the id of an enabled conditioning "
            "dataset (known: masks); fix the id, or add the mask dataset",
            id="missing-id",
        ),
        pytest.param(
            [_images(conditioning_data="other"), _images(id="other", caption_strategy="filename"), TEXT],
            "dataset 'images': 'conditioning_data' = 'other': expected a conditioning dataset with "
            '"conditioning_type": "mask", not image',
            id="not-a-mask-dataset",
        ),
        pytest.param(
            [_images(), _masks(), TEXT],
            "dataset 'masks': mask dataset linked by no image dataset; "
            'set "conditioning_data": "masks" on the image dataset it masks, or remove it',
            id="unlinked-mask",
        ),
        pytest.param(
            [_images(conditioning_data="masks"), _masks(conditioning_type="controlnet"), TEXT],
            "dataset 'masks': 'conditioning_type' = 'controlnet': expected a value raytuner supports "
            "('controlnet' is not supported yet; use one of: mask)",
            id="controlnet-not-yet",
        ),
        pytest.param(
            [_images(conditioning_data="masks"), _masks(conditioning_type=None), TEXT],
            "dataset 'masks': 'conditioning_type' = null: expected mask for a conditioning dataset",
            id="no-conditioning-type",
        ),
        pytest.param(
            [_images(), _images(id="held", dataset_type="eval", conditioning_data="masks"), _masks(), TEXT],
            "dataset 'held': 'conditioning_data' = 'masks': expected an image dataset "
            "(eval loss is never masked, as in SimpleTuner)",
            id="eval-dataset",
        ),
        pytest.param(
            [_images(conditioning_data=["masks", "more"]), _masks(), TEXT],
            "dataset 'images': 'conditioning_data' = ['masks', 'more']: expected one mask dataset id",
            id="two-masks",
        ),
    ],
)
def test_mask_links_are_checked_in_one_line_each(
    write_run: WriteRun, datasets: list[dict[str, Any]], expected: str
) -> None:
    problems = _problems(write_run, datasets)
    assert any(expected in line for line in problems), problems
    assert all("\n" not in line and line.startswith("multidatabackend.json: ") for line in problems)
