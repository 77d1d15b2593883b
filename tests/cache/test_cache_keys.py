"""The multidatabackend.json and config.json keys of the cache, each set in a real config file and shown at work.

These run the cache's own discovery, bucket and plan code on the loaded config, without Ray (the
Ray build itself is tested in test_cache_build.py). Each test is named by an ``honoured`` row of
``raytuner/config/data/compatibility.tsv``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from raytuner.batches.plan import BatchShape, PlanError, PlanSample, plan_epoch
from raytuner.batches.reader import dataset_sampling, prunes_buckets
from raytuner.cache.settings import bucket_settings, cache_setting_problems, image_datasets
from raytuner.config import RunConfig
from raytuner.data import discovery
from raytuner.data.buckets import Placement, place
from raytuner.models.registry import get_family
from tests.cache.helpers import draw_images, image_dataset, text_dataset, write_run_files


def _discover(run: RunConfig) -> dict[str, dict[str, tuple[tuple[str, ...], Placement | None]]]:
    """dataset id -> file -> (captions, placement or None when too small), as the build computes them."""
    family = get_family(run.training.model.model_family)
    found: dict[str, dict[str, tuple[tuple[str, ...], Placement | None]]] = {}
    for dataset in image_datasets(run):
        settings = bucket_settings(dataset, run, family)
        listing = discovery.list_dataset(dataset)
        location = discovery.dataset_location(dataset)
        probes = {
            listed.fingerprint: discovery.probe_file(
                listed, location, caption_strategy=dataset.caption_strategy
            )
            for listed in listing.files
        }
        images, _ = discovery.merge_probes(listing, probes)
        found[dataset.id] = {
            image.relative: (image.captions, place(settings, image.width, image.height)) for image in images
        }
    return found


def _run(tmp_path: Path, model: Path, datasets: list[dict[str, Any]], **config: Any) -> RunConfig:
    return write_run_files(tmp_path, model, [*datasets, text_dataset(tmp_path / "text")], **config).load()


def test_instance_data_dir_and_caption_strategy_choose_files_and_captions(
    tmp_path: Path, tiny_cosmos_dir: Path
) -> None:
    draw_images(tmp_path / "a", [(64, 64)])
    draw_images(tmp_path / "a", [(64, 64)], start=1, subfolder="deeper")
    (tmp_path / "a" / "a_photo_of_a_cat.jpg").write_bytes((tmp_path / "a" / "image_000.png").read_bytes())
    draw_images(tmp_path / "b", [(64, 64)], start=5)
    run = _run(
        tmp_path,
        tiny_cosmos_dir,
        [
            image_dataset(tmp_path / "a", tmp_path / "c1", id="by-file", caption_strategy="filename"),
            image_dataset(tmp_path / "a", tmp_path / "c2", id="by-text", caption_strategy="textfile"),
            image_dataset(
                tmp_path / "b",
                tmp_path / "c3",
                id="by-prompt",
                caption_strategy="instanceprompt",
                instance_prompt=" sks dog ",
            ),
        ],
    )
    found = _discover(run)
    assert {name: captions for name, (captions, _) in found["by-file"].items()} == {
        "image_000.png": ("image 000",),
        "deeper/image_001.png": ("image 001",),
        "a_photo_of_a_cat.jpg": ("a photo of a cat",),
    }
    by_text = {name: captions for name, (captions, _) in found["by-text"].items()}
    assert by_text["deeper/image_001.png"] == ((tmp_path / "a/deeper/image_001.txt").read_text().strip(),)
    assert "a_photo_of_a_cat.jpg" not in by_text  # no caption file beside it: skipped and reported
    assert {captions for captions, _ in found["by-prompt"].values()} == {("sks dog",)}


def test_resolution_keys_set_the_buckets(tmp_path: Path, tiny_cosmos_dir: Path) -> None:
    draw_images(tmp_path / "images", [(150, 100)])
    run = _run(
        tmp_path,
        tiny_cosmos_dir,
        [
            image_dataset(
                tmp_path / "images", tmp_path / "c1", id="inherits", resolution=None, resolution_type=None
            ),
            image_dataset(
                tmp_path / "images",
                tmp_path / "c2",
                id="edge",
                resolution=64,
                resolution_type="pixel",
                minimum_image_size=0,
            ),
            image_dataset(
                tmp_path / "images",
                tmp_path / "c3",
                id="megapixels",
                resolution=0.0256,
                resolution_type="area",
                minimum_image_size=0,
            ),
        ],
        resolution=128,
        resolution_type="pixel_area",
        minimum_image_size=130,
    )
    found = _discover(run)
    # config.json's 128 px area and its minimum of 130 px reach the dataset that sets neither:
    # 150 x 100 = 15,000 pixels is below 130 x 130 = 16,900, so the image is skipped there.
    assert found["inherits"]["image_000.png"][1] is None
    # pixel 64: the short edge becomes 64, the long one 64 * 1.5 = 96 (a multiple of 16).
    placed = found["edge"]["image_000.png"][1]
    assert placed is not None and placed.bucket == (96, 64)
    # area 0.0256 MP = 160 x 160 px: edge 160, 160 * sqrt(1.5) = 195.96 -> 192, 160 / sqrt(1.5) = 130.6 -> 128.
    placed = found["megapixels"]["image_000.png"][1]
    assert placed is not None and placed.bucket == (192, 128)


def test_crop_keys_choose_the_crop(tmp_path: Path, tiny_cosmos_dir: Path) -> None:
    draw_images(tmp_path / "images", [(160, 64)])
    base = {"resolution": 64, "resolution_type": "pixel", "crop": True, "crop_aspect": "square"}
    run = _run(
        tmp_path,
        tiny_cosmos_dir,
        [
            image_dataset(tmp_path / "images", tmp_path / "c1", id="centre", crop_style="center", **base),
            image_dataset(tmp_path / "images", tmp_path / "c2", id="corner", crop_style="corner", **base),
            image_dataset(
                tmp_path / "images",
                tmp_path / "c3",
                id="keep",
                crop=True,
                crop_aspect="preserve",
                resolution=64,
                resolution_type="pixel",
            ),
        ],
    )
    found = _discover(run)
    centre = found["centre"]["image_000.png"][1]
    corner = found["corner"]["image_000.png"][1]
    keep = found["keep"]["image_000.png"][1]
    assert centre is not None and corner is not None and keep is not None
    # Square 64 x 64 out of 160 x 64: centred the crop starts at (160 - 64) / 2 = 48, at the corner at 0.
    assert (centre.bucket, centre.left, centre.top) == ((64, 64), 48, 0)
    assert (corner.bucket, corner.left, corner.top) == ((64, 64), 0, 0)
    # preserve keeps the aspect: 160 / 64 = 2.5, short edge 64 -> 160 x 64.
    assert keep.bucket == (160, 64)
    # closest and random choose among crop_aspect_buckets (tests/cache/test_cache_sample_filters.py).
    closest = _run(
        tmp_path,
        tiny_cosmos_dir,
        [
            image_dataset(
                tmp_path / "images",
                tmp_path / "c4",
                crop=True,
                crop_aspect="closest",
                crop_aspect_buckets=[1.5],
                resolution_type="pixel",
            )
        ],
    )
    assert cache_setting_problems(closest) == []
    placed = _discover(closest)["shapes"]["image_000.png"][1]
    assert placed is not None and placed.bucket == (96, 64)


def test_size_limits_skip_and_downsample(tmp_path: Path, tiny_cosmos_dir: Path) -> None:
    draw_images(tmp_path / "images", [(48, 48), (256, 128)])
    crop = {
        "resolution": 64,
        "resolution_type": "pixel",
        "crop": True,
        "crop_aspect": "square",
        "crop_style": "center",
    }
    run = _run(
        tmp_path,
        tiny_cosmos_dir,
        [
            image_dataset(tmp_path / "images", tmp_path / "c1", id="plain", **crop),
            image_dataset(tmp_path / "images", tmp_path / "c2", id="minimum", minimum_image_size=64, **crop),
            image_dataset(
                tmp_path / "images",
                tmp_path / "c3",
                id="downsample",
                maximum_image_size=128,
                target_downsample_size=96,
                **crop,
            ),
        ],
    )
    found = _discover(run)
    assert found["plain"]["image_000.png"][1] is not None  # 48 px is upscaled when no minimum is set
    assert found["minimum"]["image_000.png"][1] is None  # ... and skipped below minimum_image_size 64
    plain, downsampled = found["plain"]["image_001.png"][1], found["downsample"]["image_001.png"][1]
    assert plain is not None and downsampled is not None
    # Without downsampling the 256 x 128 image is resized to 128 x 64 (short edge 64) and cropped;
    # with target_downsample_size 96 it is first brought to 192 x 96, so the crop keeps less context.
    assert plain.intermediary == (128, 64) and downsampled.intermediary == (192, 96)
    assert plain.bucket == downsampled.bucket == (64, 64)


def test_bucket_rounding_and_alignment(tmp_path: Path, tiny_cosmos_dir: Path) -> None:
    draw_images(tmp_path / "images", [(150, 100)])
    dataset = image_dataset(tmp_path / "images", tmp_path / "c1", resolution=128, resolution_type="pixel")
    coarse = _discover(_run(tmp_path, tiny_cosmos_dir, [dataset], aspect_bucket_alignment=64))["shapes"]
    fine = _discover(
        _run(tmp_path, tiny_cosmos_dir, [dataset], aspect_bucket_alignment=16, aspect_bucket_rounding=1)
    )["shapes"]
    # Alignment 64: 128 * 1.5 = 192 stays, 128 stays. Rounding 1 and alignment 16: same aspect 1.5, 192 x 128.
    coarse_placement, fine_placement = coarse["image_000.png"][1], fine["image_000.png"][1]
    assert coarse_placement is not None and fine_placement is not None
    assert coarse_placement.bucket == (192, 128) and coarse_placement.aspect == 1.5
    draw_images(tmp_path / "other", [(130, 100)])
    other = image_dataset(tmp_path / "other", tmp_path / "c2", resolution=128, resolution_type="pixel")
    # 1.3 at rounding 2 gives 128 * 1.3 = 166.4 -> 160 at alignment 16 and 192 at alignment 64.
    assert _discover(_run(tmp_path, tiny_cosmos_dir, [other], aspect_bucket_alignment=16))["shapes"][
        "image_000.png"
    ][1].bucket == (160, 128)  # type: ignore[union-attr]
    assert _discover(_run(tmp_path, tiny_cosmos_dir, [other], aspect_bucket_alignment=64))["shapes"][
        "image_000.png"
    ][1].bucket == (192, 128)  # type: ignore[union-attr]
    (problem,) = cache_setting_problems(_run(tmp_path, tiny_cosmos_dir, [dataset], aspect_bucket_alignment=8))
    assert "'aspect_bucket_alignment' = 8: expected a multiple of 16" in problem


def _samples(dataset_id: str, buckets: dict[str, int]) -> list[PlanSample]:
    return [
        PlanSample(dataset_id=dataset_id, key=f"{dataset_id}-{bucket}-{i}", bucket=bucket)
        for bucket, count in buckets.items()
        for i in range(count)
    ]


def test_repeats_and_regularisation_are_read_into_the_plan(tmp_path: Path, tiny_cosmos_dir: Path) -> None:
    (tmp_path / "images").mkdir()
    run = _run(
        tmp_path,
        tiny_cosmos_dir,
        [
            image_dataset(tmp_path / "images", tmp_path / "c1", id="subject", repeats=3),
            image_dataset(tmp_path / "images", tmp_path / "c2", id="prior", is_regularisation_data=True),
            image_dataset(tmp_path / "images", tmp_path / "c3", id="held-out", dataset_type="eval"),
        ],
    )
    sampling = dataset_sampling(run)
    assert [(s.dataset_id, s.repeats, s.is_regularisation) for s in sampling] == [
        ("subject", 3, False),
        ("prior", 0, True),
    ]
    plan = plan_epoch(
        _samples("subject", {"64x64": 2}) + _samples("prior", {"64x64": 8}),
        sampling,
        BatchShape(per_worker=2),
        seed=1,
        epoch=0,
    )
    subject_keys = [key for batch in plan.batches if batch.dataset_id == "subject" for key in batch.keys]
    assert len(subject_keys) == 2 * (1 + 3)
    assert all(batch.is_regularisation == (batch.dataset_id == "prior") for batch in plan.batches)


def test_disable_bucket_pruning_fills_small_buckets(tmp_path: Path, tiny_cosmos_dir: Path) -> None:
    (tmp_path / "images").mkdir()
    datasets = [image_dataset(tmp_path / "images", tmp_path / "c1")]
    samples = _samples("shapes", {"64x64": 4, "96x48": 1})
    shape = BatchShape(per_worker=2)
    pruned = _run(tmp_path, tiny_cosmos_dir, datasets)
    kept = _run(tmp_path, tiny_cosmos_dir, datasets, disable_bucket_pruning=True)
    plan = plan_epoch(
        samples,
        dataset_sampling(pruned),
        shape,
        seed=1,
        epoch=0,
        prune_buckets=prunes_buckets(pruned),
    )
    assert {batch.bucket for batch in plan.batches} == {"64x64"} and plan.pruned == (
        "shapes 96x48 (1 samples)",
    )
    plan = plan_epoch(
        samples,
        dataset_sampling(kept),
        shape,
        seed=1,
        epoch=0,
        prune_buckets=prunes_buckets(kept),
    )
    small = [batch for batch in plan.batches if batch.bucket == "96x48"]
    assert len(small) == 1 and small[0].keys == ("shapes-96x48-0", "shapes-96x48-0")
    with pytest.raises(PlanError, match="no images detected in dataset 'shapes'"):
        plan_epoch(samples[:1], dataset_sampling(pruned), BatchShape(per_worker=4), seed=1, epoch=0)
