"""Captions for discovered images, by SimpleTuner's ``caption_strategy``.

* ``filename``: the file name without its extension, with underscores read as spaces
  (SimpleTuner's ``PromptHandler.prepare_instance_prompt_from_filename``), stripped.
* ``textfile``: the ``.txt`` file beside the image with the same stem, UTF-8; every non-empty
  line is one caption, and training draws one of them each time the image is used, as
  SimpleTuner does (raytuner draws it from the seed, the image and the step, so runs repeat).
* ``instanceprompt``: the dataset's ``instance_prompt`` for every image.
* ``parquet``: the dataset's metadata table (:mod:`raytuner.data.metadata_table`).

``caption_shuffle`` adds shuffled orders of each caption's tags as more captions of the image
(:func:`with_shuffles`), encoded in the text cache with the others.
"""

from __future__ import annotations

import hashlib
import posixpath
import random

from raytuner.config.sample_filters import CaptionShuffle
from raytuner.errors import RaytunerError


class CaptionError(RaytunerError, ValueError):
    """An image whose caption cannot be read (reported and skipped, not fatal)."""


def caption_from_filename(path: str) -> str:
    stem = posixpath.splitext(posixpath.basename(path))[0]
    return stem.replace("_", " ").strip()


def caption_file_for(path: str) -> str:
    return posixpath.splitext(path)[0] + ".txt"


def caption_from_text(data: bytes, *, where: str) -> tuple[str, ...]:
    """Every non-empty line of a caption file, stripped (SimpleTuner strips them when it caches)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CaptionError(f"caption file {where} is not UTF-8 text") from None
    captions = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not captions:
        raise CaptionError(f"caption file {where} is empty")
    return captions


# caption_shuffle: how each split_on setting cuts a caption into tags, and joins them again.
_SPLIT = {"comma": (",", ", "), "space": (" ", " "), "period": (".", ". ")}


def shuffled_captions(caption: str, shuffle: CaptionShuffle, *, seed: int) -> tuple[str, ...]:
    """SimpleTuner's caption_shuffle of one caption: the caption (unless include_original is false),
    then up to ``count`` distinct orders of its tags, the first ``position_start`` tags kept in place.

    Each order is drawn from the seed, the caption's MD5 and the variant's number, as SimpleTuner
    draws it, so the same caption gives the same variants in every build (and in SimpleTuner). A
    caption with fewer than two tags to move stays as it is.
    """
    split, join = _SPLIT[shuffle.split_on]
    tags = [tag.strip() for tag in caption.split(split) if tag.strip()]
    fixed, movable = tags[: shuffle.position_start], tags[shuffle.position_start :]
    if len(movable) <= 1:
        return (caption,)
    variants = [caption] if shuffle.include_original else []
    caption_hash = int(hashlib.md5(caption.encode("utf-8")).hexdigest(), 16) & 0xFFFFFFFF
    base = shuffle.seed if shuffle.seed is not None else seed
    for number in range(shuffle.count):
        order = list(movable)
        random.Random(base + caption_hash + number).shuffle(order)
        variant = join.join(fixed + order)
        if variant not in variants:
            variants.append(variant)
    return tuple(variants) or (caption,)


def with_shuffles(captions: tuple[str, ...], shuffle: CaptionShuffle | None, *, seed: int) -> tuple[str, ...]:
    """Every caption of an image followed by its shuffled variants (unchanged without caption_shuffle)."""
    if shuffle is None:
        return captions
    return tuple(
        variant for caption in captions for variant in shuffled_captions(caption, shuffle, seed=seed)
    )
