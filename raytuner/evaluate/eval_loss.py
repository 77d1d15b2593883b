"""Stable evaluation loss on the ``dataset_type: eval`` datasets.

As in SimpleTuner, every evaluation image is scored at the same ``eval_timesteps`` noise levels
with the same noise, so two evaluations of the same weights give the same number and a falling
``eval_loss`` means the model got better, not that the draw was kind. The levels are evenly
spaced noise fractions and ignore the training schedule's shift: runs that sweep
``flow_schedule_shift`` are scored on the same scale. At most ``num_eval_images`` images are
used (the first by cache key, so always the same ones); the workers split them and sum.
The loss is never masked, as SimpleTuner's evaluation scores with its conditioning mask off: eval
datasets cannot link a mask dataset (the config refuses ``conditioning_data`` there). Each level
is weighted as training weights it (the family's ``loss_weight``: Cosmos2's EDM weight), as
SimpleTuner scores evaluation batches with the model's own training loss, so the train and eval
curves are in the same units.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from raytuner import flow
from raytuner.batches.plan import sample_generators, sample_seed
from raytuner.batches.reader import LatentCache, TextCache
from raytuner.config.run import RunConfig
from raytuner.models.base import ModelFamily
from raytuner.precision import autocast

if TYPE_CHECKING:  # a sweep's driver reads this module's dataset list and loads no model
    from diffusers.models.modeling_utils import ModelMixin

EVAL_NOISE_SEED = 0
# Sums a flat tensor over the workers (all-reduce sum).
ReduceSum = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class EvalSample:
    dataset_id: str
    key: str
    bucket: str


def eval_datasets(run: RunConfig) -> list[str]:
    return [dataset.id for dataset in run.enabled_datasets if dataset.dataset_type == "eval"]


def eval_samples(caches: dict[str, LatentCache], limit: int) -> list[EvalSample]:
    """The first ``limit`` eval images by (dataset, key): the same set at every evaluation."""
    samples = sorted(
        (
            EvalSample(dataset_id=s.dataset_id, key=s.key, bucket=s.bucket)
            for c in caches.values()
            for s in c.samples
        ),
        key=lambda s: (s.dataset_id, s.key),
    )
    return samples[:limit]


def eval_sigmas(count: int) -> torch.Tensor:
    """``count`` evenly spaced noise fractions, from pure noise down to 1/count (a flow scheduler's grid)."""
    return torch.linspace(1.0, 1.0 / count, count)


@torch.no_grad()
def evaluation_loss(
    family: ModelFamily,
    transformer: ModelMixin,
    samples: list[EvalSample],
    caches: dict[str, LatentCache],
    text: TextCache,
    *,
    timesteps: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    mixed_precision: str = "no",
    reduce_sum: ReduceSum | None = None,
) -> float:
    """Mean flow-matching loss over ``samples`` x ``timesteps`` fixed noise levels (all workers)."""
    mine = samples[rank::world_size]
    by_bucket: dict[tuple[str, str], list[str]] = defaultdict(list)
    for sample in mine:
        by_bucket[(sample.dataset_id, sample.bucket)].append(sample.key)
    low, high = family.sigma_range
    levels = eval_sigmas(timesteps).clamp(low, high)
    total = torch.zeros(2, dtype=torch.float64)  # sum of squared-error means, count
    was_training = transformer.training
    transformer.eval()
    try:
        for (dataset_id, _bucket), keys in sorted(by_bucket.items()):
            cache = caches[dataset_id]
            for start in range(0, len(keys), batch_size):
                chunk = keys[start : start + batch_size]
                latents = cache.latents(chunk).to(family.device, torch.float32)
                conditioning = family.collate_conditioning(
                    text.conditioning([cache.caption_key(key, seed=0, step=0) for key in chunk])
                )
                # The training loop's per-sample generators, at a seed no training step uses.
                generators = sample_generators([sample_seed(EVAL_NOISE_SEED, f"eval:{k}", 0) for k in chunk])
                noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators])
                noise = noise.to(latents.device)
                target = flow.velocity_target(latents, noise, direction=family.target_direction)
                for level in levels.tolist():
                    sigmas = torch.full((len(chunk),), level, device=latents.device)
                    noisy = flow.add_noise(latents, noise, sigmas)
                    with autocast(family.device, mixed_precision):
                        prediction = family.predict(transformer, noisy, sigmas, conditioning)
                    errors = ((prediction.float() - target) ** 2).flatten(1).mean(dim=1)
                    errors = errors * family.loss_weight(sigmas).to(errors.device)
                    total[0] += float(errors.sum())
                    total[1] += len(chunk)
    finally:
        transformer.train(was_training)
    if reduce_sum is not None:
        total = reduce_sum(total.to(family.device)).double().cpu()
    if total[1] == 0:
        raise ValueError("no evaluation samples: the eval datasets' caches are empty")
    return float(total[0] / total[1])
