"""Captions for discovered images, by SimpleTuner's ``caption_strategy``.

* ``filename``: the file name without its extension, with underscores read as spaces
  (SimpleTuner's ``PromptHandler.prepare_instance_prompt_from_filename``), stripped.
* ``textfile``: the ``.txt`` file beside the image with the same stem, UTF-8; every non-empty
  line is one caption, and training draws one of them each time the image is used, as
  SimpleTuner does (raytuner draws it from the seed, the image and the step, so runs repeat).
* ``instanceprompt``: the dataset's ``instance_prompt`` for every image.
* ``parquet``: the dataset's metadata table (:mod:`raytuner.data.metadata_table`).
"""

from __future__ import annotations

import posixpath

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
