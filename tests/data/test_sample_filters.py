"""The logic of caption_shuffle, max_num_samples, crop_aspect closest / random and the aspect limits.

The expected captions and files were worked out with SimpleTuner's own algorithms
(``CaptionShuffler.expand_with_shuffles``, ``_apply_max_num_samples_limit``), so a change here is a
change from SimpleTuner.
"""

from __future__ import annotations

from collections import Counter

import pytest

from raytuner.config.sample_filters import AspectBucket, CaptionShuffle
from raytuner.data.buckets import BucketSettings, aspect_limit_reason, chosen_aspect, place
from raytuner.data.captions import shuffled_captions, with_shuffles
from raytuner.data.sampling import chosen_files

TAGS = "portrait, red hair, smiling, outdoors, sunset"


def test_shuffled_captions_are_simpletuners_variants() -> None:
    assert shuffled_captions(TAGS, CaptionShuffle(enable=True, count=3, seed=42), seed=0) == (
        TAGS,
        "smiling, sunset, red hair, outdoors, portrait",
        "smiling, red hair, sunset, outdoors, portrait",
        "sunset, red hair, portrait, smiling, outdoors",
    )
    # position_start keeps the first tags where they are.
    pinned = shuffled_captions(TAGS, CaptionShuffle(enable=True, count=2, seed=7, position_start=1), seed=0)
    assert pinned == (
        TAGS,
        "portrait, outdoors, smiling, sunset, red hair",
        "portrait, sunset, smiling, red hair, outdoors",
    )
    # split_on space, without the original caption.
    spaced = CaptionShuffle(enable=True, count=2, seed=1, split_on="space", include_original=False)
    assert shuffled_captions("a red circle on blue", spaced, seed=0) == (
        "a blue red on circle",
        "circle red a on blue",
    )
    # Unset, the seed is config.json's: the same variants as with that seed written in the block.
    assert shuffled_captions(TAGS, CaptionShuffle(enable=True, count=3), seed=42) == shuffled_captions(
        TAGS, CaptionShuffle(enable=True, count=3, seed=42), seed=0
    )
    # One tag to move (or none) leaves the caption as it is, even without the original.
    single = CaptionShuffle(enable=True, count=4, include_original=False, position_start=4)
    assert shuffled_captions(TAGS, single, seed=0) == (TAGS,)
    assert shuffled_captions("a red circle", CaptionShuffle(enable=True, count=4), seed=0) == (
        "a red circle",
    )
    # Every caption of an image gets its own variants; no block, no change.
    both = with_shuffles((TAGS, "one, two"), CaptionShuffle(enable=True, count=1, seed=3), seed=0)
    assert both[0] == TAGS and both[2:] in (("one, two", "two, one"), ("one, two",))
    assert with_shuffles((TAGS,), None, seed=0) == (TAGS,)


def test_max_num_samples_chooses_as_simpletuner() -> None:
    files = [f"img_{index}.png" for index in range(10)]
    assert chosen_files(files, dataset_id="shapes", limit=3) == {"img_1.png", "img_4.png", "img_9.png"}
    # The choice depends on the names, not on the order they were listed in, and on the dataset id.
    assert chosen_files(files[::-1], dataset_id="shapes", limit=3) == {"img_1.png", "img_4.png", "img_9.png"}
    assert chosen_files(files, dataset_id="other", limit=3) != {"img_1.png", "img_4.png", "img_9.png"}
    assert chosen_files(files, dataset_id="shapes", limit=None) == set(files)
    assert chosen_files(files, dataset_id="shapes", limit=0) == set(files)
    assert chosen_files(files, dataset_id="shapes", limit=20) == set(files)


BUCKETS = (AspectBucket(aspect=1.0), AspectBucket(aspect=0.75), AspectBucket(aspect=1.5))


def _settings(crop_aspect: str, buckets: tuple[AspectBucket, ...] = BUCKETS, **keys: float) -> BucketSettings:
    return BucketSettings(
        resolution=64,
        resolution_type="pixel",
        crop=True,
        crop_aspect=crop_aspect,
        crop_aspect_buckets=buckets,
        alignment=16,
        **keys,
    )


@pytest.mark.parametrize(
    ("size", "aspect", "bucket"),
    [((200, 100), 1.5, (96, 64)), ((100, 120), 0.75, (64, 80)), ((100, 98), 1.0, (64, 64))],
)
def test_closest_takes_the_nearest_bucket(
    size: tuple[int, int], aspect: float, bucket: tuple[int, int]
) -> None:
    settings = _settings("closest")
    assert chosen_aspect(settings, round(size[0] / size[1], 2), crop_seed=0) == aspect
    placement = place(settings, *size, crop_seed=5)
    assert placement is not None and placement.bucket == bucket
    # The crop box lies inside the resized image.
    assert (
        placement.crop_box[2] <= placement.intermediary[0]
        and placement.crop_box[3] <= placement.intermediary[1]
    )


def test_random_draws_one_bucket_per_seed_by_weight() -> None:
    settings = _settings("random")
    draws = [chosen_aspect(settings, 1.0, crop_seed=seed) for seed in range(300)]
    assert set(draws) == {1.0, 0.75, 1.5}
    # The same seed (the same image) draws the same bucket every time.
    assert [chosen_aspect(settings, 1.0, crop_seed=seed) for seed in range(300)] == draws
    weighted = _settings(
        "random", (AspectBucket(aspect=1.0, weight=0.9), AspectBucket(aspect=2.0, weight=0.1))
    )
    counts = Counter(chosen_aspect(weighted, 1.0, crop_seed=seed) for seed in range(1000))
    assert counts[1.0] > 800 and counts[2.0] > 50
    zero = _settings("random", (AspectBucket(aspect=1.0, weight=1.0), AspectBucket(aspect=2.0, weight=0.0)))
    assert {chosen_aspect(zero, 1.0, crop_seed=seed) for seed in range(100)} == {1.0}
    # Without crop, crop_aspect is not read (as in SimpleTuner): the image keeps its own aspect.
    uncropped = BucketSettings(resolution=64, resolution_type="pixel", crop_aspect="random", alignment=16)
    placement = place(uncropped, 200, 100)
    assert placement is not None and placement.bucket == (128, 64)


def test_aspect_limits_apply_to_the_bucket() -> None:
    settings = BucketSettings(
        resolution=64,
        resolution_type="pixel",
        alignment=16,
        minimum_aspect_ratio=0.8,
        maximum_aspect_ratio=1.6,
    )
    wide, tall, square = place(settings, 200, 100), place(settings, 100, 200), place(settings, 150, 100)
    assert wide is not None and tall is not None and square is not None
    assert aspect_limit_reason(settings, wide) == (
        "bucket 128x64 has aspect ratio 2, above maximum_aspect_ratio 1.6"
    )
    assert (
        aspect_limit_reason(settings, tall)
        == "bucket 64x128 has aspect ratio 0.5, below minimum_aspect_ratio 0.8"
    )
    assert aspect_limit_reason(settings, square) is None
    # A square crop makes every bucket 1.0, whatever the image's own shape.
    cropped = BucketSettings(
        resolution=64, resolution_type="pixel", alignment=16, crop=True, maximum_aspect_ratio=1.2
    )
    placed = place(cropped, 200, 100)
    assert placed is not None and aspect_limit_reason(cropped, placed) is None
    # 0 is no limit.
    unlimited = BucketSettings(resolution=64, resolution_type="pixel", alignment=16, minimum_aspect_ratio=0)
    assert tall is not None and aspect_limit_reason(unlimited, tall) is None
