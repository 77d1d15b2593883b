"""The cache's keys: a prompt's, a latent row's (its content), and a file's sample key in the plan.

A key changes exactly when what it names would encode differently, so an unchanged row is never
encoded twice and a changed one never read stale. Changing how a key is computed re-encodes every
cache written before, so each stays as it is.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from raytuner.data.buckets import Placement
from raytuner.data.discovery import DiscoveredImage, DiscoveredMask


def caption_key(prompt: str) -> str:
    """The text cache's key: the prompt itself, hashed (many images share a caption)."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:32]


def content_key(
    image: DiscoveredImage, placement: Placement, vae_key: str, mask: DiscoveredMask | None = None
) -> str:
    """A latent row's key: the file's bytes, its crop and resize, the VAE that encodes it, and its
    mask's bytes when it has one (so adding, changing or dropping a mask re-encodes the row)."""
    fields: dict[str, Any] = {
        "sha256": image.sha256,
        "bucket": placement.bucket,
        "intermediary": placement.intermediary,
        "crop": [placement.left, placement.top],
        "resample": "lanczos",
        "vae": vae_key,
    }
    if mask is not None:
        # Only masked rows carry the field: the keys of caches without masks stay as they were.
        fields["mask"] = {"sha256": mask.sha256, "grid": "red-channel-area"}
    payload = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def sample_key(content: str, relative: str) -> str:
    """The plan's key of a file whose latent row an earlier file of its dataset (by relative path) holds.

    SimpleTuner trains every file, and users copy a file on purpose to weight it: byte-identical
    files share one latent row, but each is a sample of its own, drawn, captioned and noised by its
    own key. The first file keeps the content key as its sample key, so a dataset without copies
    plans exactly as before.
    """
    return hashlib.sha256(f"{content}\0{relative}".encode()).hexdigest()[:32]


def index_row_id(row: Mapping[str, Any]) -> str:
    """What identifies an index row: a latent row's sample key, a text row's caption key.

    Latent indexes written before identical files were samples of their own have no ``sample``
    column and one row per content key, which is then the sample key too.
    """
    return str(row.get("sample") or row["key"])
