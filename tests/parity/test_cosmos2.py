"""Cosmos2: raytuner's training math held against SimpleTuner's (``tests/parity/simpletuner.py``).

Where raytuner follows SimpleTuner the tests ask for equality; where it deliberately differs
(``docs/simpletuner-differences.md``: the shift, regularisation data) they assert the documented
difference, so a change either way is noticed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raytuner import flow
from raytuner.cache.stages import mask_on_latent_grid
from raytuner.models.registry import get_family
from raytuner.train.step import MicroBatch, micro_batch_loss
from tests.parity import simpletuner as st
from tests.parity.helpers import (
    DRAWS,
    SAME_DISTRIBUTION,
    TinyRun,
    expanded_latents,
    ks_statistic,
    per_sample_losses,
    tiny_run,
)

# SimpleTuner's Cosmos2 draws EDM sigmas and applies no shift; raytuner's default schedule (no
# shift, logit-normal at scale 1) is the one to compare with.
NO_SHIFT = flow.FlowSchedule()
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def run(tiny_cosmos_dir: Path) -> TinyRun:
    return tiny_run("cosmos2image", tiny_cosmos_dir)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def test_the_loss_weight_is_simpletuners_edm_weight_in_velocity_terms() -> None:
    cosmos2 = get_family("cosmos2image")
    t = torch.linspace(0.01, 0.99, 99)
    # EDM x0 error = t * velocity error, so the EDM weight times t**2 is the velocity weight.
    expected = t**2 * st.cosmos2_edm_weight(st.cosmos2_edm_sigma_of(t))
    torch.testing.assert_close(cosmos2.loss_weight(t), expected)
    assert cosmos2.loss_weight(torch.tensor([0.5])).item() == pytest.approx(0.5)
    torch.testing.assert_close(get_family("omnigen").loss_weight(t), torch.ones_like(t))


def test_the_transformer_sees_simpletuners_input_and_timestep_and_the_loss_is_simpletuners(
    run: TinyRun,
) -> None:
    family = run.family
    alone = per_sample_losses(run, NO_SHIFT)
    noise, t, calls = alone.noise, alone.sigmas, alone.calls
    batch = family.training_loss(
        run.transformer, run.latents, run.conditioning, NO_SHIFT, generator=run.generators()
    ).loss

    reference = st.cosmos2_step(
        run.transformer, run.latents, noise, st.cosmos2_edm_sigma_of(t), run.conditioning["prompt_embeds"]
    )
    torch.testing.assert_close(
        torch.cat([c["hidden_states"] for c in calls.inputs]), reference.model_input, **TOLERANCE
    )
    torch.testing.assert_close(
        torch.cat([c["timestep"] for c in calls.inputs]), reference.timestep, **TOLERANCE
    )
    # raytuner regresses the velocity noise - x0; the pipeline's own conversion x0 = z_t - t * v
    # turns it into SimpleTuner's x0 target.
    velocity = flow.velocity_target(run.latents, noise, direction=family.target_direction)
    torch.testing.assert_close(
        reference.model_input - _per_sample(t, velocity) * velocity, reference.target, **TOLERANCE
    )
    torch.testing.assert_close(alone.losses, reference.per_sample_loss, **TOLERANCE)
    torch.testing.assert_close(batch, reference.per_sample_loss.mean(), **TOLERANCE)


def test_a_masked_batch_is_weighted_as_simpletuner_weights_it(run: TinyRun) -> None:
    family = run.family
    height, width = (8 * size for size in run.latents.shape[-2:])
    mask_pixels = torch.zeros(run.latents.shape[0], 1, height, width, dtype=torch.uint8)
    mask_pixels[:, :, :, : width // 2] = 255  # learn the left half
    mask_pixels[:, :, : height // 4, :] = 128  # and the top rows at half weight
    latent_masks = torch.stack(
        [
            torch.from_numpy(mask_on_latent_grid(m[0].numpy(), tuple(run.latents.shape[-2:])))
            for m in mask_pixels
        ]
    )
    noise, t = family.sample_noise_and_sigmas(run.latents, NO_SHIFT, generator=run.generators())
    batch = MicroBatch(
        latents=run.latents,
        conditioning=run.conditioning,
        generators=run.generators(),
        loss_mask=latent_masks,
    )
    loss = micro_batch_loss(family, run.transformer, run.network, batch, NO_SHIFT)
    reference = st.cosmos2_step(
        run.transformer,
        run.latents,
        noise,
        st.cosmos2_edm_sigma_of(t),
        run.conditioning["prompt_embeds"],
        mask_pixels=mask_pixels,
    )
    torch.testing.assert_close(loss, reference.per_sample_loss.mean(), **TOLERANCE)


def test_regularisation_data_is_trained_towards_the_base_model_where_simpletuners_cosmos2_ignores_it(
    run: TinyRun,
) -> None:
    """A documented difference: SimpleTuner computes the parent's prediction for regularisation
    batches, but its Cosmos2 loss regresses x0 and never reads it, so those images train as
    ordinary data; raytuner regresses the parent's prediction (what the trainer meant)."""
    family = run.family
    noise, t = family.sample_noise_and_sigmas(run.latents, NO_SHIFT, generator=run.generators())
    batch = MicroBatch(
        latents=run.latents,
        conditioning=run.conditioning,
        generators=run.generators(),
        is_regularisation=True,
    )
    loss = micro_batch_loss(family, run.transformer, run.network, batch, NO_SHIFT)
    sigmas = st.cosmos2_edm_sigma_of(t)
    embeds = run.conditioning["prompt_embeds"]
    with st.parent_model(run.network):
        parent = st.cosmos2_step(run.transformer, run.latents, noise, sigmas, embeds).prediction
    towards_parent = st.cosmos2_step(run.transformer, run.latents, noise, sigmas, embeds, target_x0=parent)
    torch.testing.assert_close(loss, towards_parent.per_sample_loss.mean(), **TOLERANCE)
    simpletuners = st.cosmos2_step(run.transformer, run.latents, noise, sigmas, embeds)
    assert float(loss.detach()) < 0.5 * float(simpletuners.per_sample_loss.mean())


def _simpletuner_noise_fractions(count: int) -> torch.Tensor:
    uniform = torch.rand(count, generator=torch.Generator().manual_seed(11))
    return st.cosmos2_noise_fraction(st.cosmos2_edm_sigmas(uniform))


def _raytuner_noise_fractions(run: TinyRun, schedule: flow.FlowSchedule, latent_size: int) -> torch.Tensor:
    latents = expanded_latents(torch.zeros(1, 16, 1, latent_size, latent_size), DRAWS)
    return run.family.sample_sigmas(latents, schedule, generator=torch.Generator().manual_seed(12))


def test_timesteps_are_drawn_from_simpletuners_edm_distribution_with_its_clamps(run: TinyRun) -> None:
    simpletuner = _simpletuner_noise_fractions(DRAWS)
    raytuner = _raytuner_noise_fractions(run, NO_SHIFT, 128)
    assert ks_statistic(raytuner, simpletuner) < SAME_DISTRIBUTION
    low, high = st.cosmos2_noise_fraction(torch.tensor([st.COSMOS_SIGMA_MIN, st.COSMOS_SIGMA_MAX])).tolist()
    assert run.family.sigma_range == pytest.approx((low, high))
    extremes = torch.tensor([-20.0, 20.0])  # normal draws far past either clamp
    assert torch.sigmoid(extremes).clamp(*run.family.sigma_range).tolist() == pytest.approx([low, high])
    assert low <= float(raytuner.min()) and float(raytuner.max()) <= high


def test_the_shift_is_applied_to_simpletuners_distribution_where_simpletuners_cosmos2_ignores_it(
    run: TinyRun,
) -> None:
    """A documented difference: the Cosmos2 quickstart has flow_schedule_auto_shift shape the
    timesteps; SimpleTuner's Cosmos2 code draws its EDM sigmas without it."""
    simpletuner = _simpletuner_noise_fractions(DRAWS)
    # A 1024 x 1024 image: 128 x 128 latents, 64 x 64 tokens -> auto-shift exp(1.15).
    auto = _raytuner_noise_fractions(run, flow.FlowSchedule(auto_shift=True), 128)
    shift = flow.resolution_dependent_shift(64 * 64)
    assert shift == pytest.approx(torch.e**1.15)
    shifted = flow.shift_sigmas(simpletuner, shift).clamp(*run.family.sigma_range)
    assert ks_statistic(auto, shifted) < SAME_DISTRIBUTION
    assert ks_statistic(auto, simpletuner) > 0.2
    static = _raytuner_noise_fractions(run, flow.FlowSchedule(shift=3.0), 128)
    assert (
        ks_statistic(static, flow.shift_sigmas(simpletuner, 3.0).clamp(*run.family.sigma_range))
        < SAME_DISTRIBUTION
    )
