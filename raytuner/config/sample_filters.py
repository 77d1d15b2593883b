"""A dataset entry's nested settings that choose and reshape its samples: ``crop_aspect_buckets``
(the aspect ratios of ``crop_aspect`` random or closest) and the ``caption_shuffle`` block.

SimpleTuner's forms: ``crop_aspect_buckets`` is a list of aspect ratios (``[1.0, 0.75, 1.5]``)
or, for ``random``, a list of ``{"aspect": 1.5, "weight": 0.25}`` whose weights add up to 1.
``caption_shuffle`` is ``{"enable": true, "count": 3, "seed": 42, "split_on": "comma",
"position_start": 1, "include_original": true}``; without ``"enable": true`` it does nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

from raytuner.config.fields import problem
from raytuner.config.keys import KeyFindings, sort_block_keys

CROP_BUCKETS_KEY = "crop_aspect_buckets"
CAPTION_SHUFFLE_BLOCK = "caption_shuffle"
SplitOn = Literal["comma", "space", "period"]
SPLIT_ON: tuple[str, ...] = get_args(SplitOn)
CAPTION_SHUFFLE_KEYS: frozenset[str] = frozenset(
    f"{CAPTION_SHUFFLE_BLOCK}.{name}"
    for name in ("enable", "count", "seed", "split_on", "position_start", "include_original")
)
# SimpleTuner checks that weights add up to exactly 1.0; a float sum such as 0.1 + 0.2 + 0.7 may
# miss it by rounding, which is no reason to refuse a config.
_WEIGHT_TOLERANCE = 1e-6
_BUCKETS_EXAMPLE = '[1.0, 0.75, 1.5] or [{"aspect": 1.0, "weight": 0.5}, {"aspect": 1.5, "weight": 0.5}]'


@dataclass(frozen=True, kw_only=True)
class AspectBucket:
    """One aspect ratio (width / height) of ``crop_aspect_buckets``; ``weight`` only in the dict form."""

    aspect: float
    weight: float | None = None


@dataclass(frozen=True, kw_only=True)
class CaptionShuffle:
    """SimpleTuner's ``caption_shuffle``: each caption's tags shuffled into ``count`` more captions.

    ``seed`` None: config.json's seed (SimpleTuner's default).
    """

    enable: bool = False
    count: int = 1
    seed: int | None = None
    split_on: SplitOn = "comma"
    position_start: int = 0
    include_original: bool = True


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def parse_crop_buckets(
    value: Any, *, crop_aspect: str, label: str, problems: list[str]
) -> tuple[AspectBucket, ...] | None:
    """The typed list, or None with one problem appended. Weights are checked for ``random``, the
    only crop that reads them (SimpleTuner checks them when it draws)."""

    def refuse(expected: str) -> None:
        problems.append(problem(label, CROP_BUCKETS_KEY, value, expected, f"write it as {_BUCKETS_EXAMPLE}"))

    if not isinstance(value, list) or not value:
        refuse("a non-empty list of aspect ratios")
        return None
    if all(isinstance(item, dict) for item in value):
        buckets = []
        for item in value:
            aspect, weight = _number(item.get("aspect")), _number(item.get("weight"))
            extra = set(item) - {"aspect", "weight"}
            # closest reads only the aspect, as in SimpleTuner; random draws by the weights.
            unweighted = weight is None and crop_aspect != "random" and "weight" not in item
            if (
                aspect is None
                or aspect <= 0
                or extra
                or not (unweighted or (weight is not None and weight >= 0))
            ):
                refuse('objects with a positive "aspect" and a "weight" (no other keys)')
                return None
            buckets.append(AspectBucket(aspect=aspect, weight=weight))
        total = sum(bucket.weight or 0.0 for bucket in buckets)
        if crop_aspect == "random" and abs(total - 1.0) > _WEIGHT_TOLERANCE:
            refuse(f"weights that add up to 1 (they add up to {total:g})")
            return None
        return tuple(buckets)
    numbers = [_number(item) for item in value]
    if any(number is None or number <= 0 for number in numbers):
        refuse("positive aspect ratios (width / height), all numbers or all objects")
        return None
    return tuple(AspectBucket(aspect=number) for number in numbers if number is not None)


def check_crop_aspect(
    crop_aspect: str, buckets: tuple[AspectBucket, ...] | None, *, label: str, problems: list[str]
) -> None:
    """random and closest need buckets, as in SimpleTuner (``None``: written, and refused already)."""
    if crop_aspect in ("random", "closest") and buckets == ():
        problems.append(
            problem(
                label,
                CROP_BUCKETS_KEY,
                None,
                f"a list of aspect ratios, because crop_aspect is {crop_aspect}",
                f'add "crop_aspect_buckets": {_BUCKETS_EXAMPLE}',
            )
        )


def parse_caption_shuffle(
    value: Any, *, where: str, place: str, strict: bool, findings: KeyFindings
) -> CaptionShuffle | None:
    """The typed block (None when off: absent, false or empty), each bad value one problem."""
    label = f"{where}: {place}"
    if value is None or value is False or value == {}:
        return None
    if not isinstance(value, dict):
        findings.problems.append(
            problem(
                label,
                CAPTION_SHUFFLE_BLOCK,
                value,
                'an object like {"enable": true, "count": 3}',
                "SimpleTuner reads caption_shuffle as an object of settings",
            )
        )
        return None
    kept = sort_block_keys(
        CAPTION_SHUFFLE_BLOCK,
        value,
        fields=CAPTION_SHUFFLE_KEYS,
        where=where,
        place=place,
        strict=strict,
        findings=findings,
    )
    before = len(findings.problems)
    for key in ("enable", "include_original"):
        if key in kept and not isinstance(kept[key], bool):
            findings.problems.append(
                problem(label, f"{CAPTION_SHUFFLE_BLOCK}.{key}", kept[key], "true or false")
            )
    whole_numbers = (
        ("count", 1, "a positive whole number"),
        ("position_start", 0, "a whole number, 0 or more"),
        ("seed", None, "a whole number"),
    )
    for key, lowest, expected in whole_numbers:
        item = kept.get(key)
        if item is None:
            continue
        if isinstance(item, bool) or not isinstance(item, int) or (lowest is not None and item < lowest):
            findings.problems.append(problem(label, f"{CAPTION_SHUFFLE_BLOCK}.{key}", item, expected))
    if "split_on" in kept and kept["split_on"] not in SPLIT_ON:
        findings.problems.append(
            problem(
                label, f"{CAPTION_SHUFFLE_BLOCK}.split_on", kept["split_on"], f"one of {', '.join(SPLIT_ON)}"
            )
        )
    if len(findings.problems) > before:
        return None
    settings = CaptionShuffle(**{key: item for key, item in kept.items() if item is not None})
    if not settings.enable:
        findings.warnings.append(
            f'{label}: caption_shuffle has no effect without "enable": true (as in SimpleTuner); '
            'add "enable": true to shuffle the tags, or remove the block'
        )
        return None
    return settings


def read_sample_blocks(
    entry: dict[str, Any], *, crop_aspect: str, where: str, place: str, strict: bool, findings: KeyFindings
) -> tuple[tuple[AspectBucket, ...], CaptionShuffle | None]:
    """A dataset entry's ``crop_aspect_buckets`` and ``caption_shuffle``, each bad value a problem."""
    label = f"{where}: {place}"
    buckets: tuple[AspectBucket, ...] | None = ()
    if entry.get(CROP_BUCKETS_KEY) is not None:
        buckets = parse_crop_buckets(
            entry[CROP_BUCKETS_KEY], crop_aspect=crop_aspect, label=label, problems=findings.problems
        )
    check_crop_aspect(crop_aspect, buckets, label=label, problems=findings.problems)
    shuffle = parse_caption_shuffle(
        entry.get(CAPTION_SHUFFLE_BLOCK), where=where, place=place, strict=strict, findings=findings
    )
    return buckets or (), shuffle
