"""Aspect buckets and crop boxes: SimpleTuner's ``TrainingSample`` geometry, as plain Python.

Every image gets a *target* size (its bucket: width x height in pixels, a multiple of the
alignment) and an *intermediary* size: the image is first resized to the intermediary, keeping
its own aspect ratio, and the target is then cropped out of it. This is the order SimpleTuner
uses with ``crop`` on or off (with ``crop`` off the few overflow pixels of the aspect rounding
are cropped, not squashed).

Formulas follow SimpleTuner's ``MultiaspectImage.calculate_new_size_by_pixel_edge`` (``pixel``),
``calculate_new_size_by_pixel_area`` (``area``) and ``TrainingSample.calculate_target_size``;
``pixel_area`` is an edge length in pixels turned into megapixels (``edge**2 / 1e6``), as
SimpleTuner's backend factory does for ``resolution``, ``minimum_image_size``,
``maximum_image_size`` and ``target_downsample_size``. Rounding to the alignment uses Python's
``round`` (banker's rounding), as SimpleTuner does.

Where raytuner deliberately differs (each keeps latents valid for the model):

* the alignment is at least the family's pixels per transformer token (16 for Cosmos2 and
  OmniGen): a bucket the transformer cannot patch is never produced;
* in ``pixel`` mode the square edge is aligned too (SimpleTuner uses ``int(resolution)``);
* a ``minimum_image_size`` inherited from ``config.json`` is converted like a dataset's own.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

from raytuner.config.sample_filters import AspectBucket
from raytuner.errors import RaytunerError

RESOLUTION_TYPES = ("pixel", "area", "pixel_area")
CROP_STYLES = ("center", "centre", "corner", "random")
# TrainingSample._set_resolution: megapixel values it snaps to a well-known square edge (±0.05).
_KNOWN_AREAS = {0.25: 512**2, 0.5: 768**2, 1.0: 1024**2, 2.0: 1536**2, 4.0: 2048**2}


class BucketError(RaytunerError, ValueError):
    """Settings that cannot produce a bucket (named, with the fix)."""


@dataclass(frozen=True, kw_only=True)
class BucketSettings:
    """One dataset's geometry settings, already resolved against config.json."""

    resolution: float
    resolution_type: str = "pixel_area"
    minimum_image_size: float | None = None
    maximum_image_size: float | None = None
    target_downsample_size: float | None = None
    crop: bool = False
    crop_aspect: str = "square"
    crop_style: str = "random"
    rounding: int = 2  # aspect_bucket_rounding
    alignment: int = 64  # aspect_bucket_alignment
    crop_aspect_buckets: tuple[AspectBucket, ...] = ()
    minimum_aspect_ratio: float | None = None
    maximum_aspect_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.resolution_type not in RESOLUTION_TYPES:
            raise BucketError(
                f"resolution_type {self.resolution_type!r}: expected one of {', '.join(RESOLUTION_TYPES)}"
            )
        if self.crop_style not in CROP_STYLES:
            raise BucketError(f"crop_style {self.crop_style!r}: expected one of {', '.join(CROP_STYLES)}")
        if self.crop and self.crop_aspect in ("random", "closest") and not self.crop_aspect_buckets:
            raise BucketError(
                f"crop_aspect {self.crop_aspect!r} needs crop_aspect_buckets (a list of aspect ratios)"
            )

    @property
    def mode(self) -> str:
        """``pixel`` or ``area``: ``pixel_area`` is area in megapixels."""
        return "pixel" if self.resolution_type == "pixel" else "area"

    def in_mode_units(self, value: float | None) -> float | None:
        """A size setting in the calculator's units (megapixels for pixel_area)."""
        if value is None or value <= 0:
            return None
        return value * value / 1e6 if self.resolution_type == "pixel_area" else float(value)

    @property
    def target(self) -> float:
        value = self.in_mode_units(self.resolution)
        assert value is not None
        return value


@dataclass(frozen=True, kw_only=True)
class Placement:
    """Where one image goes: resize to ``intermediary``, then crop ``bucket`` at ``(left, top)``."""

    bucket: tuple[int, int]  # target (width, height)
    intermediary: tuple[int, int]
    left: int
    top: int
    aspect: float  # SimpleTuner's bucket key: round(width / height, rounding)

    @property
    def label(self) -> str:
        return f"{self.bucket[0]}x{self.bucket[1]}"

    @property
    def crop_box(self) -> tuple[int, int, int, int]:
        """``(left, top, right, bottom)`` in the intermediary image, as PIL's ``crop`` takes it."""
        return (self.left, self.top, self.left + self.bucket[0], self.top + self.bucket[1])


def round_to_multiple(value: float, alignment: int) -> int:
    return max(round(value / alignment) * alignment, alignment)


def aspect_of(width: int, height: int, rounding: int) -> float:
    """SimpleTuner's rounded aspect ratio; never 0, so a 1:1000 strip still gets a (thin) bucket."""
    return max(round(width / height, rounding), 10.0**-rounding)


def square_edge(settings: BucketSettings) -> int:
    """``pixel_resolution``: the edge of square buckets."""
    if settings.mode == "pixel":
        return round_to_multiple(int(settings.resolution), settings.alignment)
    megapixels = settings.target
    area = next((a for mp, a in _KNOWN_AREAS.items() if abs(mp - megapixels) <= 0.05), megapixels * 1e6)
    return round_to_multiple(math.sqrt(area), settings.alignment)


def size_by_pixel_edge(
    aspect: float, resolution: float, original: tuple[int, int], alignment: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``pixel`` mode: the shorter edge becomes ``resolution``. Returns (target, intermediary)."""
    width, height = original
    ratio = width / height
    target_w: float
    target_h: float
    if width < height:
        target_w, target_h = resolution, int(resolution / aspect)
    else:
        target_w, target_h = int(resolution * aspect), resolution
    adjusted = (round_to_multiple(target_w, alignment), round_to_multiple(target_h, alignment))
    inter_w: float
    inter_h: float
    if ratio >= 1:
        inter_h = max(adjusted[1], target_h)
        inter_w = int(inter_h * ratio)
        if inter_w < adjusted[0]:
            inter_w = adjusted[0]
            inter_h = int(inter_w / ratio)
    else:
        inter_w = max(adjusted[0], target_w)
        inter_h = int(inter_w / ratio)
        if inter_h < adjusted[1]:
            inter_h = adjusted[1]
            inter_w = int(inter_h * ratio)
    return adjusted, (int(inter_w), int(inter_h))


def size_by_pixel_area(
    aspect: float, megapixels: float, original: tuple[int, int], alignment: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``area`` mode: about ``megapixels`` at the bucket's aspect. Returns (target, intermediary)."""
    width, height = original
    edge = round_to_multiple(int(math.sqrt(megapixels * 1e6)), alignment)
    if aspect == 1.0 and width == height:
        return (edge, edge), (edge, edge)
    ratio = width / height
    target_w = round_to_multiple(edge * math.sqrt(aspect), alignment)
    target_h = round_to_multiple(edge / math.sqrt(aspect), alignment)
    if target_w < target_h:
        inter_w, inter_h = target_w, int(target_w / ratio)
    else:
        inter_w, inter_h = int(target_h * ratio), target_h
    if target_w > inter_w or target_h > inter_h:
        # Grow the intermediary, keeping the image's own aspect, until the target fits inside it.
        if target_w > inter_w:
            grow_w = target_w - inter_w
            grow_h = int(grow_w / ratio)
        else:
            grow_h = target_h - inter_h
            grow_w = int(grow_h * ratio)
        inter_w, inter_h = inter_w + grow_w, inter_h + grow_h
    return (target_w, target_h), (inter_w, inter_h)


def _calculate(
    settings: BucketSettings, aspect: float, size: float, original: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    if settings.mode == "pixel":
        return size_by_pixel_edge(aspect, size, original, settings.alignment)
    return size_by_pixel_area(aspect, size, original, settings.alignment)


def meets_minimum(settings: BucketSettings, width: int, height: int) -> bool:
    """SimpleTuner's ``meets_resolution_requirements``, against the original size."""
    minimum = settings.in_mode_units(settings.minimum_image_size)
    if minimum is None:
        return True
    if settings.mode == "pixel":
        return width >= minimum and height >= minimum
    if width * height < minimum * 1e6:
        return False
    if settings.crop and settings.crop_aspect == "square":
        edge = math.floor(math.sqrt(minimum * 1e6))
        return width >= edge and height >= edge
    return True


def _fit_around(intermediary: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """Scale ``intermediary`` up, keeping its aspect, until both edges hold the target."""
    scale = max(target[0] / intermediary[0], target[1] / intermediary[1], 1.0)
    width, height = math.ceil(intermediary[0] * scale), math.ceil(intermediary[1] * scale)
    return max(width, target[0]), max(height, target[1])


def crop_origin(
    intermediary: tuple[int, int], bucket: tuple[int, int], style: str, *, crop_seed: int
) -> tuple[int, int]:
    """``(left, top)`` of the crop: centre, top-left corner, or a seeded random offset."""
    spare_w, spare_h = intermediary[0] - bucket[0], intermediary[1] - bucket[1]
    if style == "corner":
        return 0, 0
    if style in ("center", "centre"):
        return max(0, int(spare_w / 2)), max(0, int(spare_h / 2))
    rng = random.Random(crop_seed)
    return rng.randint(0, spare_w), rng.randint(0, spare_h)


def place(settings: BucketSettings, width: int, height: int, *, crop_seed: int = 0) -> Placement | None:
    """The bucket and crop of an image of ``width`` x ``height``; None when it is too small.

    ``crop_seed`` fixes a random crop (derive it from the run's seed and the file's content so
    the cache key of an unchanged image stays the same from one build to the next).
    """
    if width <= 0 or height <= 0:
        return None
    if not meets_minimum(settings, width, height):
        return None
    original = (width, height)
    edge = square_edge(settings)
    if settings.crop and settings.crop_aspect == "square":
        target = (edge, edge)
        _, intermediary = _calculate(settings, 1.0, settings.target, original)
    else:
        wanted = aspect_of(width, height, settings.rounding)
        if settings.crop and settings.crop_aspect in ("random", "closest"):
            wanted = chosen_aspect(settings, wanted, crop_seed=crop_seed)
        target, intermediary = _calculate(settings, wanted, settings.target, original)
    aspect = aspect_of(*target, settings.rounding)
    if aspect == 1.0:
        # TrainingSample: square buckets use pixel_resolution, and the intermediary must cover it.
        target = (edge, edge)
        if intermediary[0] < edge:
            intermediary = (edge, edge) if width == height else _fit_around(intermediary, target)
    downsample = settings.in_mode_units(settings.target_downsample_size)
    if (
        settings.crop
        and settings.maximum_image_size
        and downsample is not None
        and _larger_than_target(settings, original)
    ):
        # Downsample before cropping: more of the scene survives than in a crop of the full image.
        _, intermediary = _calculate(
            settings, aspect_of(width, height, settings.rounding), downsample, original
        )
    intermediary = _fit_around(intermediary, target)
    left, top = crop_origin(intermediary, target, settings.crop_style, crop_seed=crop_seed)
    return Placement(bucket=target, intermediary=intermediary, left=left, top=top, aspect=aspect)


def chosen_aspect(settings: BucketSettings, own: float, *, crop_seed: int) -> float:
    """crop_aspect closest: the bucket nearest the image's own (rounded) aspect, the first on a tie;
    random: one drawn per image (by weight in the dict form), fixed by ``crop_seed`` so that a
    rebuild draws the same bucket and the cache keeps its rows."""
    buckets = settings.crop_aspect_buckets
    if settings.crop_aspect == "closest":
        return min(buckets, key=lambda bucket: abs(bucket.aspect - own)).aspect
    rng = random.Random(f"crop_aspect:{crop_seed}")
    if buckets[0].weight is None:
        return rng.choice(buckets).aspect
    return rng.choices(buckets, weights=[bucket.weight or 0.0 for bucket in buckets])[0].aspect


def aspect_limit_reason(settings: BucketSettings, placement: Placement) -> str | None:
    """Why a placed image is left out by minimum_aspect_ratio / maximum_aspect_ratio (None: kept).

    As SimpleTuner, the limits apply to the bucket's aspect (width / height after the crop), and 0
    means no limit.
    """
    low, high = settings.minimum_aspect_ratio, settings.maximum_aspect_ratio
    if low and placement.aspect < low:
        return f"bucket {placement.label} has aspect ratio {placement.aspect:g}, below minimum_aspect_ratio {low:g}"
    if high and placement.aspect > high:
        return f"bucket {placement.label} has aspect ratio {placement.aspect:g}, above maximum_aspect_ratio {high:g}"
    return None


def _larger_than_target(settings: BucketSettings, original: tuple[int, int]) -> bool:
    """SimpleTuner downsamples before cropping only images larger than the resolution asks for."""
    width, height = original
    if settings.mode == "pixel":
        edge = square_edge(settings)
        return width > edge or height > edge
    return width * height > settings.target * 1e6


def crop_seed_for(seed: int, content_sha256: str) -> int:
    """A random crop fixed by the run's seed and the file's bytes."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{content_sha256}".encode()).digest()[:8], "little")
