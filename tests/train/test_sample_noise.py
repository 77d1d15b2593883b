"""Per-sample noise and sigma: seeded by (seed, sample key, step), the same whichever rank trains a sample."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raytuner import flow
from raytuner.batches.plan import BatchShape, GlobalBatch, sample_generators
from raytuner.models.registry import get_family

KEYS = ("key-a", "key-b", "key-c", "key-d")


def _batch(keys: tuple[str, ...] = KEYS) -> GlobalBatch:
    return GlobalBatch(dataset_id="d", bucket="64x64", keys=keys, is_regularisation=False)


def test_seeds_follow_the_sample_not_the_rank() -> None:
    batch = _batch()
    one_worker = BatchShape(per_worker=2, workers=1, accumulation=2)
    two_workers = BatchShape(per_worker=2, workers=2, accumulation=1)
    single = [
        (key, seed)
        for micro in range(2)
        for key, seed in zip(
            batch.slice_for(one_worker, rank=0, micro_step=micro),
            batch.seeds_for(one_worker, rank=0, micro_step=micro, seed=3, step=7),
            strict=True,
        )
    ]
    split = [
        (key, seed)
        for rank in range(2)
        for key, seed in zip(
            batch.slice_for(two_workers, rank=rank),
            batch.seeds_for(two_workers, rank=rank, seed=3, step=7),
            strict=True,
        )
    ]
    assert single == split
    assert len({seed for _, seed in single}) == 4
    later = batch.seeds_for(two_workers, rank=0, seed=3, step=8)
    assert later != batch.seeds_for(two_workers, rank=0, seed=3, step=7)


def test_a_key_twice_in_one_batch_gets_two_seeds() -> None:
    batch = _batch(("key-a", "key-a", "key-b", "key-b"))
    seeds = batch.seeds_for(BatchShape(per_worker=4), rank=0, seed=1, step=0)
    assert len(set(seeds)) == 4


@pytest.mark.parametrize("family_name", ["cosmos2image", "omnigen"])
def test_a_samples_noise_and_loss_do_not_depend_on_its_batch(
    family_name: str, tiny_checkpoints: dict[str, Path]
) -> None:
    family = get_family(family_name)(tiny_checkpoints[family_name])
    transformer = family.load_transformer().eval()
    generator = torch.Generator().manual_seed(0)
    shape = (2, 16, 1, 8, 8) if family_name == "cosmos2image" else (2, 4, 8, 8)
    latents = torch.randn(shape, generator=generator)
    conditioning = family.encode_prompts(["a red circle", "a blue square"])
    schedule = flow.FlowSchedule()
    seeds = (101, 202)

    noise, sigmas = family.sample_noise_and_sigmas(latents, schedule, generator=sample_generators(seeds))
    swapped_noise, swapped_sigmas = family.sample_noise_and_sigmas(
        latents.flip(0), schedule, generator=sample_generators(seeds[::-1])
    )
    torch.testing.assert_close(swapped_noise, noise.flip(0))
    torch.testing.assert_close(swapped_sigmas, sigmas.flip(0))

    with torch.no_grad():
        together = family.training_loss(
            transformer,
            latents,
            family.collate_conditioning(conditioning),
            schedule,
            generator=sample_generators(seeds),
        ).loss
        alone = [
            family.training_loss(
                transformer,
                latents[i : i + 1],
                family.collate_conditioning(conditioning[i : i + 1]),
                schedule,
                generator=sample_generators(seeds[i : i + 1]),
            ).loss
            for i in range(2)
        ]
    # The batch loss is the mean over samples of equal size: a 2-way split gives the same number.
    torch.testing.assert_close(together, torch.stack(alone).mean(), rtol=1e-4, atol=1e-6)
