"""``max_num_samples``: a dataset limited to N of its images, the same N in every build.

SimpleTuner picks them by shuffling the sorted file list with a generator seeded by the dataset's
id and keeping the first N, before any file is read; raytuner does the same, over the files'
paths below the dataset's folder (or a Hugging Face split's row names). Relative paths keep the
choice, and so the cache, unchanged when the folder is moved or mounted elsewhere (SimpleTuner
sorts full paths). Files skipped while listing (zero-byte, no caption file) count among the
candidates, as SimpleTuner lists them before it reads them.
"""

from __future__ import annotations

import logging
import random

logger = logging.getLogger(__name__)


def chosen_files(relatives: list[str], *, dataset_id: str, limit: int | None) -> set[str]:
    """The relative paths kept under ``limit`` (all of them when unset, 0 or not exceeded)."""
    if not limit or len(relatives) <= limit:
        return set(relatives)
    order = sorted(relatives)
    random.Random(dataset_id).shuffle(order)
    logger.info(
        "dataset '%s': max_num_samples %d keeps %d of %d files (the same ones every build)",
        dataset_id,
        limit,
        limit,
        len(relatives),
    )
    return set(order[:limit])
