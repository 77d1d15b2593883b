"""Aspect buckets and crop boxes, against SimpleTuner's own numbers and hand-worked formulas."""

from __future__ import annotations

import pytest

from raytuner.data.buckets import BucketError, BucketSettings, Placement, place, round_to_multiple


def _placed(settings: BucketSettings, width: int, height: int, *, crop_seed: int = 0) -> Placement:
    placement = place(settings, width, height, crop_seed=crop_seed)
    assert placement is not None, f"{width}x{height} was not placed"
    return placement


def _assert_well_formed(placement: Placement, alignment: int) -> None:
    """Bucket edges are multiples of the alignment; the crop box lies inside the intermediary."""
    width, height = placement.bucket
    assert width % alignment == 0 and height % alignment == 0
    assert width >= alignment and height >= alignment
    left, top, right, bottom = placement.crop_box
    inter_w, inter_h = placement.intermediary
    assert inter_w >= width and inter_h >= height
    assert left >= 0 and top >= 0 and right <= inter_w and bottom <= inter_h


# Worked examples from running SimpleTuner's own code (alignment 64, rounding 2, crop off):
# original, resolution_type, resolution -> bucket, intermediary, aspect.
SIMPLETUNER_CASES = [
    ((1500, 1000), "pixel", 1024, (1536, 1024), (1536, 1024), 1.5),
    ((1000, 1333), "pixel", 1024, (1024, 1344), (1024, 1364), 0.76),
    ((1920, 1080), "pixel", 1024, (1792, 1024), (1820, 1024), 1.75),
    ((1500, 1000), "area", 1.0, (1280, 832), (1280, 853), 1.54),
    ((1500, 1000), "pixel_area", 1024, (1280, 832), (1280, 853), 1.54),
    ((1000, 1333), "area", 1.0, (896, 1152), (896, 1194), 0.78),
    ((1920, 1080), "area", 1.0, (1344, 768), (1365, 768), 1.75),
    ((4000, 3000), "area", 1.0, (1152, 896), (1194, 896), 1.29),
]
each_simpletuner_case = pytest.mark.parametrize(
    ("original", "resolution_type", "resolution", "bucket", "intermediary", "aspect"), SIMPLETUNER_CASES
)


@each_simpletuner_case
def test_buckets_match_simpletuner(
    original: tuple[int, int],
    resolution_type: str,
    resolution: float,
    bucket: tuple[int, int],
    intermediary: tuple[int, int],
    aspect: float,
) -> None:
    settings = BucketSettings(resolution=resolution, resolution_type=resolution_type, crop_style="corner")
    placement = _placed(settings, *original)
    assert placement.bucket == bucket
    assert placement.intermediary == intermediary
    assert placement.aspect == aspect
    assert placement.label == f"{bucket[0]}x{bucket[1]}"
    _assert_well_formed(placement, 64)


def test_alignment_16_gives_finer_buckets() -> None:
    # SimpleTuner, pixel_area 1024 with aspect_bucket_alignment 16: 1500x1000 -> 1248x832 (aspect 1.5).
    settings = BucketSettings(resolution=1024, resolution_type="pixel_area", alignment=16)
    placement = _placed(settings, 1500, 1000)
    assert placement.bucket == (1248, 832)
    assert placement.aspect == 1.5
    _assert_well_formed(placement, 16)


# Square crop. Pixel mode, 1024: the square edge is 1024; the intermediary keeps the image's aspect
# with its short edge at 1024: 1920x1080 -> int(1024 * 1920/1080) = int(1820.44) = 1820 -> 1820x1024.
# Area mode, 1.0 MP: edge round(int(sqrt(1e6)) / 64) * 64 = 1024; for 1920x1080 the intermediary is
# int(1024 * 1.7778) = 1820 x 1024; for 1080x1920 it starts at int(1024 * 0.5625) = 576 x 1024 and
# grows by 1024 - 576 = 448 wide, int(448 / 0.5625) = 796 high -> 1024x1820.
# Either way the spare 1820 - 1024 = 796 pixels are on the long edge.
SQUARE_CROP_CASES = [
    ("pixel", 1024, (1920, 1080), (1820, 1024)),
    ("pixel", 1024, (1080, 1920), (1024, 1820)),
    ("area", 1.0, (1920, 1080), (1820, 1024)),
    ("area", 1.0, (1080, 1920), (1024, 1820)),
]


@pytest.mark.parametrize(("resolution_type", "resolution", "original", "intermediary"), SQUARE_CROP_CASES)
def test_square_crop_centre_takes_half_the_spare_pixels(
    resolution_type: str, resolution: float, original: tuple[int, int], intermediary: tuple[int, int]
) -> None:
    settings = BucketSettings(
        resolution=resolution,
        resolution_type=resolution_type,
        crop=True,
        crop_aspect="square",
        crop_style="center",
    )
    placement = _placed(settings, *original)
    assert placement.bucket == (1024, 1024)
    assert placement.aspect == 1.0
    assert placement.intermediary == intermediary
    # centre: int(796 / 2) = 398 along the long edge, 0 along the short one
    expected = (398, 0) if original[0] > original[1] else (0, 398)
    assert (placement.left, placement.top) == expected
    _assert_well_formed(placement, 64)


@pytest.mark.parametrize("original", [(1920, 1080), (1080, 1920)])
def test_square_crop_corner_starts_at_the_top_left(original: tuple[int, int]) -> None:
    settings = BucketSettings(resolution=1024, resolution_type="pixel", crop=True, crop_style="corner")
    placement = _placed(settings, *original)
    assert placement.bucket == (1024, 1024)
    assert (placement.left, placement.top) == (0, 0)
    assert placement.crop_box == (0, 0, 1024, 1024)


def test_square_crop_random_is_in_bounds_and_fixed_by_the_seed() -> None:
    # 1920x1080 -> intermediary 1820x1024 (see above): left in [0, 796], top 0.
    settings = BucketSettings(resolution=1024, resolution_type="pixel", crop=True, crop_style="random")
    origins = set()
    for crop_seed in range(20):
        placement = _placed(settings, 1920, 1080, crop_seed=crop_seed)
        assert 0 <= placement.left <= 796 and placement.top == 0
        _assert_well_formed(placement, 64)
        again = _placed(settings, 1920, 1080, crop_seed=crop_seed)
        assert (again.left, again.top) == (placement.left, placement.top)
        origins.add((placement.left, placement.top))
    assert len(origins) > 1


@each_simpletuner_case
def test_without_crop_only_the_aspect_overflow_is_cropped(
    original: tuple[int, int],
    resolution_type: str,
    resolution: float,
    bucket: tuple[int, int],
    intermediary: tuple[int, int],
    aspect: float,
) -> None:
    settings = BucketSettings(resolution=resolution, resolution_type=resolution_type, crop_style="center")
    placement = _placed(settings, *original)
    spare_w = placement.intermediary[0] - placement.bucket[0]
    spare_h = placement.intermediary[1] - placement.bucket[1]
    # The image is resized keeping its own aspect (no squash), then trimmed along one edge only,
    # by less than one alignment step.
    assert min(spare_w, spare_h) == 0
    assert max(spare_w, spare_h) < 64
    inter_w, inter_h = placement.intermediary
    width, height = original
    assert abs(inter_w - inter_h * width / height) <= 1 or abs(inter_h - inter_w * height / width) <= 1
    assert (placement.left, placement.top) == (spare_w // 2, spare_h // 2)


# Extreme aspects, alignment 16.
# pixel 64: 4000x100 has aspect 40.0 -> width int(64 * 40) = 2560, height 64; the intermediary is
# 64 high and int(64 * 40) = 2560 wide. 100x4000 has aspect round(0.025, 2) = 0.03 -> height
# int(64 / 0.03) = 2133 -> round(133.3) * 16 = 2128; the intermediary is 64 wide, int(64 / 0.025) = 2560 high.
# pixel_area 64 (0.004096 MP, edge 64): 4000x100 -> width round(64 * sqrt(40) / 16) * 16 =
# round(25.3) * 16 = 400, height max(round(64 / sqrt(40) / 16) * 16, 16) = 16; the intermediary is
# 16 high, int(16 * 40) = 640 wide. 100x4000 -> width 16, height round(64 / sqrt(0.03) / 16) * 16 =
# round(23.09) * 16 = 368; the intermediary is 16 wide, int(16 / 0.025) = 640 high.
EXTREME_CASES = [
    ("pixel", (4000, 100), (2560, 64), (2560, 64)),
    ("pixel", (100, 4000), (64, 2128), (64, 2560)),
    ("pixel_area", (4000, 100), (400, 16), (640, 16)),
    ("pixel_area", (100, 4000), (16, 368), (16, 640)),
]


@pytest.mark.parametrize(("resolution_type", "original", "bucket", "intermediary"), EXTREME_CASES)
@pytest.mark.parametrize("crop_style", ["center", "corner", "random"])
def test_extreme_aspects_give_aligned_buckets_inside_the_intermediary(
    resolution_type: str,
    original: tuple[int, int],
    bucket: tuple[int, int],
    intermediary: tuple[int, int],
    crop_style: str,
) -> None:
    settings = BucketSettings(
        resolution=64, resolution_type=resolution_type, alignment=16, crop_style=crop_style
    )
    placement = _placed(settings, *original, crop_seed=3)
    assert placement.bucket == bucket
    assert placement.intermediary == intermediary
    _assert_well_formed(placement, 16)


@pytest.mark.parametrize("resolution_type", ["pixel", "area", "pixel_area"])
def test_an_image_whose_aspect_rounds_to_zero_does_not_crash(resolution_type: str) -> None:
    # 17x4000: 17 / 4000 = 0.00425, which rounds (2 digits) to an aspect of 0.0. Placing it must
    # either skip it (None) or give a well-formed placement, never raise.
    resolution = {"pixel": 64, "area": 0.25, "pixel_area": 64}[resolution_type]
    settings = BucketSettings(resolution=resolution, resolution_type=resolution_type, alignment=16)
    placement = place(settings, 17, 4000)
    if placement is not None:
        _assert_well_formed(placement, 16)


def test_pixel_minimum_applies_to_each_edge() -> None:
    settings = BucketSettings(resolution=1024, resolution_type="pixel", minimum_image_size=512)
    assert place(settings, 600, 400) is None
    assert place(settings, 400, 600) is None
    assert place(settings, 600, 512) is not None


def test_pixel_area_minimum_is_an_edge_turned_into_megapixels() -> None:
    # 512 px -> 512**2 / 1e6 = 0.262144 MP = 262144 pixels of area, whatever the shape:
    # 600x437 = 262200 is enough, 600x436 = 261600 is not.
    settings = BucketSettings(resolution=1024, resolution_type="pixel_area", minimum_image_size=512)
    assert settings.in_mode_units(512) == pytest.approx(0.262144)
    assert place(settings, 600, 436) is None
    assert place(settings, 600, 437) is not None
    assert place(settings, 1000, 300) is not None  # 300000 pixels: an edge below 512 is fine


def test_area_minimum_is_in_megapixels() -> None:
    # 0.25 MP = 250000 pixels: 500x499 = 249500 is too small, 500x500 is not.
    settings = BucketSettings(resolution=1.0, resolution_type="area", minimum_image_size=0.25)
    assert place(settings, 500, 499) is None
    assert place(settings, 500, 500) is not None


def test_area_minimum_with_square_crop_also_needs_the_square_edge() -> None:
    # 1000x400 = 400000 pixels >= 250000, but its short edge 400 < floor(sqrt(250000)) = 500.
    settings = BucketSettings(resolution=1.0, resolution_type="area", minimum_image_size=0.25, crop=True)
    assert place(settings, 1000, 400) is None
    assert place(settings, 1000, 500) is not None


def test_without_a_minimum_a_small_image_is_upscaled_into_a_bucket() -> None:
    # pixel 1024: 100x100 -> 1024x1024.
    square = _placed(BucketSettings(resolution=1024, resolution_type="pixel"), 100, 100)
    assert square.bucket == square.intermediary == (1024, 1024)
    # area 1.0: 200x100 has aspect 2.0 -> width round(1024 * sqrt(2) / 64) * 64 = round(22.63) * 64 = 1472,
    # height round(1024 / sqrt(2) / 64) * 64 = round(11.31) * 64 = 704; the intermediary starts at
    # int(704 * 2) = 1408 x 704 and grows by 1472 - 1408 = 64 wide, int(64 / 2) = 32 high -> 1472x736.
    wide = _placed(BucketSettings(resolution=1.0, resolution_type="area"), 200, 100)
    assert wide.bucket == (1472, 704)
    assert wide.intermediary == (1472, 736)
    assert place(BucketSettings(resolution=1024, resolution_type="pixel"), 0, 100) is None


@pytest.mark.parametrize("crop_aspect", ["random", "closest"])
def test_crop_aspects_that_need_bucket_lists_are_refused_with_crop_on(crop_aspect: str) -> None:
    with pytest.raises(BucketError, match="crop_aspect_buckets"):
        BucketSettings(resolution=1024, crop=True, crop_aspect=crop_aspect)
    BucketSettings(resolution=1024, crop=False, crop_aspect=crop_aspect)  # unused without crop


def test_unknown_crop_style_and_resolution_type_are_refused() -> None:
    with pytest.raises(BucketError, match="crop_style 'middle'"):
        BucketSettings(resolution=1024, crop_style="middle")
    with pytest.raises(BucketError, match="resolution_type 'megapixel'"):
        BucketSettings(resolution=1024, resolution_type="megapixel")


def test_crop_with_maximum_size_downsamples_to_the_target_downsample_size_first() -> None:
    # pixel 512, square crop, 3000x2000 (aspect 1.5). Without downsampling the intermediary has its
    # short edge at 512: int(512 * 1.5) = 768 -> 768x512. With target_downsample_size 768 it is sized
    # for 768 instead: int(768 * 1.5) = 1152 -> 1152x768, and the centre crop is at
    # ((1152 - 512) / 2, (768 - 512) / 2) = (320, 128).
    plain = BucketSettings(resolution=512, resolution_type="pixel", crop=True, crop_style="center")
    assert _placed(plain, 3000, 2000).intermediary == (768, 512)
    settings = BucketSettings(
        resolution=512,
        resolution_type="pixel",
        crop=True,
        crop_style="center",
        maximum_image_size=2048,
        target_downsample_size=768,
    )
    placement = _placed(settings, 3000, 2000)
    assert placement.bucket == (512, 512)
    assert placement.intermediary == (1152, 768)
    assert (placement.left, placement.top) == (320, 128)
    _assert_well_formed(placement, 64)


def test_target_downsample_size_is_unused_without_crop() -> None:
    settings = BucketSettings(
        resolution=1024, resolution_type="pixel", maximum_image_size=2048, target_downsample_size=1536
    )
    assert _placed(settings, 1920, 1080).intermediary == (1820, 1024)


def test_round_to_multiple_rounds_half_to_even_and_never_below_the_alignment() -> None:
    assert round_to_multiple(1000, 16) == 992  # 1000 / 16 = 62.5 -> 62 -> 992
    assert round_to_multiple(1016, 16) == 1024  # 63.5 -> 64 -> 1024
    assert round_to_multiple(1023, 64) == 1024
    assert round_to_multiple(3, 16) == 16
    assert round_to_multiple(0, 64) == 64


@pytest.mark.parametrize("resolution_type", ["pixel", "area", "pixel_area"])
@pytest.mark.parametrize("crop", [False, True])
@pytest.mark.parametrize("crop_style", ["center", "corner", "random"])
def test_every_crop_box_lies_inside_its_intermediary(
    resolution_type: str, crop: bool, crop_style: str
) -> None:
    resolution = {"pixel": 512, "area": 0.25, "pixel_area": 512}[resolution_type]
    settings = BucketSettings(
        resolution=resolution, resolution_type=resolution_type, crop=crop, crop_style=crop_style, alignment=16
    )
    sizes = [
        (w, h) for w in (33, 100, 511, 512, 640, 1023, 1920, 4000) for h in (33, 100, 480, 512, 1080, 3000)
    ]
    for index, (width, height) in enumerate(sizes):
        _assert_well_formed(_placed(settings, width, height, crop_seed=index), 16)
