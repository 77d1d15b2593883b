"""The micro-batches of each step on this worker, read from the cache by the epoch plan.

The plan is a pure function of the cache, the seed and the batch shape, and each sample's noise,
sigma and caption dropout come from (seed, key, step): step ``s`` reads the same samples with the
same noise on every restart, which is what resuming from a checkpoint's step relies on.
"""

from __future__ import annotations

import torch

from raytuner.batches.plan import BatchShape, sample_generators
from raytuner.batches.reader import TrainingData
from raytuner.models.base import ModelFamily
from raytuner.train.step import MicroBatch


class StepFeed:
    """This worker's slice of each global batch, one micro-batch per accumulation step."""

    def __init__(
        self,
        data: TrainingData,
        shape: BatchShape,
        family: ModelFamily,
        *,
        seed: int,
        rank: int,
        device: torch.device,
    ) -> None:
        self.data = data
        self.shape = shape
        self.family = family
        self.seed = seed
        self.rank = rank
        self.device = device
        # Which epoch and batch each step reads (dataset start_step/end_step included).
        self.steps = data.step_plans(shape, seed=seed)

    def epoch_of(self, step: int) -> int:
        """The epoch that step ``step`` (0-based) trains in."""
        return self.steps.epoch_of(step)

    def micro_batches(self, step: int) -> list[MicroBatch]:
        batch, epoch = self.steps.batch(step), self.steps.epoch_of(step)
        micro = []
        for micro_step in range(self.shape.accumulation):
            keys = batch.slice_for(self.shape, rank=self.rank, micro_step=micro_step)
            latents, conditioning = self.data.batch(batch, keys, seed=self.seed, step=step, epoch=epoch)
            seeds = batch.seeds_for(
                self.shape, rank=self.rank, micro_step=micro_step, seed=self.seed, step=step
            )
            micro.append(
                MicroBatch(
                    latents=latents.to(self.device),
                    conditioning=self.family.collate_conditioning(conditioning),
                    generators=sample_generators(seeds),
                    is_regularisation=batch.is_regularisation,
                    loss_mask=self.data.loss_masks(batch, keys),
                )
            )
        return micro
