"""``delete_problematic_images``: deleting the files of a dataset that cannot be decoded.

As in SimpleTuner, "problematic" is a file that is not a readable image: zero bytes, not an
image, corrupt or truncated. Images too small for the bucket are ``delete_unwanted_images``
(not this), and files that could not be read for a reason outside the file (permissions, the
network) are never deleted: they may read next time. SimpleTuner deletes such files from a local
folder and from an S3 bucket (type aws); raytuner does both. A Hugging Face dataset's rows cannot
be deleted (SimpleTuner skips them with a warning); raytuner says so in the report and the log.
Nothing is deleted unless the dataset or config.json sets the key.
"""

from __future__ import annotations

import logging
import posixpath

import pyarrow as pa

from raytuner.data.discovery import UNDECODABLE, Listing, SkippedFile
from raytuner.storage import describe_error

logger = logging.getLogger(__name__)

DELETED = "deleted (delete_problematic_images)"
NOT_DELETED_HUB = "not deleted: rows of a Hugging Face dataset cannot be deleted, as in SimpleTuner"


def is_problematic(reason: str) -> bool:
    return reason.startswith(UNDECODABLE)


def delete_problematic(listing: Listing, skipped: list[SkippedFile]) -> list[SkippedFile]:
    """``skipped`` with each problematic file of the dataset deleted and its reason saying so.

    Runs where the build is driven, which lists the dataset and so sees its files.
    """
    dataset = listing.dataset
    if not dataset.delete_problematic_images:
        return skipped
    location = listing.location
    result: list[SkippedFile] = []
    deleted: list[str] = []
    for skip in skipped:
        if not is_problematic(skip.reason):
            result.append(skip)
            continue
        if location.hub is not None:
            outcome = NOT_DELETED_HUB
        else:
            filesystem, root = location.resolve()
            path = posixpath.join(root, skip.relative) if root else skip.relative
            try:
                filesystem.delete_file(path)
                outcome = DELETED
                deleted.append(skip.relative)
            except (OSError, pa.ArrowException) as error:
                outcome = f"not deleted: {describe_error(skip.relative, error)}"
        result.append(
            SkippedFile(
                dataset_id=skip.dataset_id, relative=skip.relative, reason=f"{skip.reason}; {outcome}"
            )
        )
        if outcome != DELETED:
            logger.warning("dataset '%s': problematic file %s %s", dataset.id, skip.relative, outcome)
    if deleted:
        logger.warning(
            "dataset '%s': deleted %d problematic file(s) from %s (delete_problematic_images): %s",
            dataset.id,
            len(deleted),
            location,
            ", ".join(deleted),
        )
    return result
