"""The micro-batches of each step on this worker, read from the cache by the epoch plan.

The plan is a pure function of the cache, the seed and the batch shape, and each sample's noise,
sigma and caption dropout come from (seed, key, step): step ``s`` reads the same samples with the
same noise on every restart, which is what resuming from a checkpoint's step relies on.
"""

from __future__ import annotations

import torch

from raytuner.batches.plan import BatchShape, EpochPlan, sample_generators
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
        steps_per_epoch: int,
        rank: int,
        device: torch.device,
    ) -> None:
        self.data = data
        self.shape = shape
        self.family = family
        self.seed = seed
        self.steps_per_epoch = steps_per_epoch
        self.rank = rank
        self.device = device
        self._plans: dict[int, EpochPlan] = {}

    def plan(self, epoch: int) -> EpochPlan:
        if epoch not in self._plans:  # one epoch's plan kept at a time
            self._plans = {epoch: self.data.plan(self.shape, seed=self.seed, epoch=epoch)}
        return self._plans[epoch]

    def micro_batches(self, step: int) -> list[MicroBatch]:
        epoch, index = divmod(step, self.steps_per_epoch)
        batch = self.plan(epoch).batches[index]
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
