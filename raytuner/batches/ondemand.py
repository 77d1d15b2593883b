"""The training workers' VAE: latents of the images the cache build left pending.

A dataset with ``vae_cache_ondemand`` (or ``vae_cache_clear_each_epoch``) reaches training with
pending rows (``raytuner.cache.ondemand``): the image, its bucket and crop. When a batch holds one,
:class:`~raytuner.batches.reader.LatentCache` hands it here; the image is read, resized and cropped
by the cache build's own stage function and encoded by the same family code, so the latent is the
one ``raytuner cache`` would have written.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from raytuner.cache import stages
from raytuner.cache.format import CacheError
from raytuner.cache.settings import model_path_of, vae_identity
from raytuner.config.run import RunConfig
from raytuner.data import discovery
from raytuner.models.registry import get_family
from raytuner.storage import Location

if TYPE_CHECKING:
    from raytuner.models.base import ModelFamily

logger = logging.getLogger(__name__)


def default_device() -> torch.device:
    """This process's accelerator (Ray Train gives each worker its own), else the CPU."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


class WorkerEncoder:
    """The family's VAE on one worker, loaded at the first image it encodes, with the cache's settings.

    ``vae_enable_slicing``/``vae_enable_tiling`` apply as in the build's VAE actors (float32, the
    family's own encode); before the first image the VAE's identity is checked against the cache's
    encoder key, so a worker never writes latents of another VAE into a cache.
    """

    def __init__(self, run: RunConfig, *, device: torch.device | None = None) -> None:
        self.run = run
        self.device = device or default_device()
        self.sources: dict[str, Location] = {
            dataset.id: discovery.dataset_location(dataset)
            for dataset in run.enabled_datasets
            if dataset.needs_images
        }
        self._family: ModelFamily | None = None
        self._checked: set[str] = set()
        self.encoded = 0  # images encoded by this worker, for the log and the tests

    def family(self, encoder_key: str, folder: Location) -> ModelFamily:
        if self._family is None:
            family_cls = get_family(self.run.training.model.model_family)
            self._family = family_cls(
                model_path_of(self.run), revision=self.run.training.model.revision, device=self.device
            )
            data = self.run.training.data
            self._family.apply_vae_options(slicing=data.vae_enable_slicing, tiling=data.vae_enable_tiling)
            logger.info("encoding latents on this worker (%s) as batches need them", self.device)
        if encoder_key not in self._checked:
            mine = vae_identity(self.run, self._family)
            if mine.key != encoder_key:
                raise CacheError(
                    f"{folder}: cache encoder key {encoder_key}, but this run's VAE has key {mine.key}; "
                    "run `raytuner cache` (with --rebuild to re-encode it) before training"
                )
            self._checked.add(encoder_key)
        return self._family

    def encode(
        self, rows: Sequence[dict[str, Any]], *, encoder_key: str, folder: Location
    ) -> list[dict[str, Any]]:
        """Pending rows (:data:`~raytuner.cache.ondemand.PENDING_COLUMNS`) read, cropped and encoded:
        :func:`~raytuner.cache.stages.encode_cropped`'s rows. A file that cannot be read stops the run."""
        family = self.family(encoder_key, folder)
        cropped = [stages.load_and_crop(dict(row), self.sources) for row in rows]
        for row in cropped:
            if row["error"]:
                raise CacheError(
                    f"dataset '{row['dataset_id']}': {row['source']}: {row['error']} (encoding it on demand); "
                    "fix or remove the file and run `raytuner cache` again"
                )
        with torch.no_grad():
            encoded = stages.encode_cropped(family, cropped)
        self.encoded += len(encoded)
        return encoded


@dataclass(frozen=True, kw_only=True)
class OnDemand:
    """How a dataset's pending rows are encoded: by ``encoder``, written back unless ``every_epoch``
    (vae_cache_clear_each_epoch), with random crops (``crop_style``) redrawn each epoch from ``seed``."""

    encoder: WorkerEncoder
    every_epoch: bool = False
    crop_style: str | None = None  # set only when crops are redrawn each epoch
    seed: int = 0
