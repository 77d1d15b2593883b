"""The dataset keys that choose and reshape samples, as multidatabackend.json and config.json give
them: read, defaulted as SimpleTuner defaults them, and each bad value one clear line."""

from __future__ import annotations

from typing import Any

import pytest

from raytuner.config import load_config
from raytuner.config.errors import ConfigError
from raytuner.config.sample_filters import AspectBucket, CaptionShuffle
from tests.config.helpers import BASE_DATASETS, WriteRun

IMAGES, TEXT = BASE_DATASETS


def test_the_keys_are_read_into_the_dataset(write_run: WriteRun) -> None:
    entry = {
        **IMAGES,
        "crop": True,
        "crop_aspect": "random",
        "crop_aspect_buckets": [{"aspect": 1.0, "weight": 0.75}, {"aspect": 1.5, "weight": 0.25}],
        "minimum_aspect_ratio": 0.5,
        "maximum_aspect_ratio": "2",
        "max_num_samples": 10,
        "caption_shuffle": {"enable": True, "count": 3, "split_on": "space", "position_start": 1},
    }
    run = load_config(write_run(datasets=[entry, TEXT]))
    dataset = run.datasets[0]
    assert dataset.crop_aspect_buckets == (
        AspectBucket(aspect=1.0, weight=0.75),
        AspectBucket(aspect=1.5, weight=0.25),
    )
    assert (dataset.minimum_aspect_ratio, dataset.maximum_aspect_ratio, dataset.max_num_samples) == (
        0.5,
        2.0,
        10,
    )
    assert dataset.caption_shuffle == CaptionShuffle(enable=True, count=3, split_on="space", position_start=1)
    assert dataset.delete_problematic_images is False  # config.json's default
    assert not [warning for warning in run.warnings if "not yet supported" in warning]
    # closest reads plain ratios; without "enable": true caption_shuffle does nothing, and says so.
    plain = {
        **IMAGES,
        "crop_aspect": "closest",
        "crop_aspect_buckets": [1, 0.75],
        "caption_shuffle": {"count": 2},
    }
    run = load_config(write_run(datasets=[plain, TEXT]))
    assert run.datasets[0].crop_aspect_buckets == (AspectBucket(aspect=1.0), AspectBucket(aspect=0.75))
    assert run.datasets[0].caption_shuffle is None
    assert any('caption_shuffle has no effect without "enable": true' in warning for warning in run.warnings)
    # closest reads only the aspects of the dict form, so weights may be left out there.
    objects = {**IMAGES, "crop_aspect": "closest", "crop_aspect_buckets": [{"aspect": 1.5}, {"aspect": 0.5}]}
    run = load_config(write_run(datasets=[objects, TEXT]))
    assert run.datasets[0].crop_aspect_buckets == (AspectBucket(aspect=1.5), AspectBucket(aspect=0.5))


def test_delete_problematic_images_in_config_json_reaches_every_dataset_without_a_warning(
    write_run: WriteRun,
) -> None:
    # SimpleTuner's example configs (omnigen.lycoris-lokr among them) set it in config.json.
    own = {**IMAGES, "id": "own", "delete_problematic_images": False}
    run = load_config(
        write_run(datasets=[IMAGES, own, TEXT], config_updates={"delete_problematic_images": True})
    )
    assert run.training.data.delete_problematic_images is True
    by_id = {dataset.id: dataset.delete_problematic_images for dataset in run.datasets}
    assert (by_id["images"], by_id["own"]) == (True, False)
    assert not [line for line in run.warnings + run.notes if "delete_problematic_images" in line]


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            {"crop": True, "crop_aspect": "random"},
            "'crop_aspect_buckets' = null: expected a list of aspect ratios, because crop_aspect is random",
        ),
        (
            {"crop_aspect": "closest", "crop_aspect_buckets": []},
            "'crop_aspect_buckets' = []: expected a non-empty list",
        ),
        ({"crop_aspect": "closest", "crop_aspect_buckets": [1.0, "wide"]}, "expected positive aspect ratios"),
        (
            {"crop_aspect": "closest", "crop_aspect_buckets": [1.0, {"aspect": 2.0, "weight": 1}]},
            "all numbers or all objects",
        ),
        (
            {
                "crop_aspect": "random",
                "crop_aspect_buckets": [{"aspect": 1.0, "weight": 0.5}, {"aspect": 2.0, "weight": 0.4}],
            },
            "weights that add up to 1 (they add up to 0.9)",
        ),
        (
            {"crop_aspect": "random", "crop_aspect_buckets": [{"aspect_bucket": 1.0, "weight": 1}]},
            'a positive "aspect"',
        ),
        ({"caption_shuffle": True}, "'caption_shuffle' = true: expected an object like"),
        (
            {"caption_shuffle": {"enable": True, "count": 0}},
            "'caption_shuffle.count' = 0: expected a positive whole number",
        ),
        (
            {"caption_shuffle": {"enable": True, "split_on": "tab"}},
            "'caption_shuffle.split_on' = 'tab': expected one of comma, space, period",
        ),
        (
            {"caption_shuffle": {"enable": True, "position_start": -1}},
            "'caption_shuffle.position_start' = -1",
        ),
        ({"max_num_samples": -1}, "'max_num_samples' = -1"),
        ({"minimum_aspect_ratio": "narrow"}, "'minimum_aspect_ratio' = 'narrow'"),
    ],
    ids=str,
)
def test_bad_crop_aspect_buckets_and_caption_shuffle_are_one_clear_line(
    write_run: WriteRun, keys: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(write_run(datasets=[{**IMAGES, **keys}, TEXT]))
    assert message in str(raised.value)
    assert "Traceback" not in str(raised.value)
