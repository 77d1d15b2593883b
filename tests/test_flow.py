"""Flow-matching math on CPU: hand-computed values, conventions, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from raytuner import flow


def test_shift_matches_sd3_formula_by_hand() -> None:
    sigmas = torch.tensor([0.0, 0.25, 0.5, 1.0])
    shifted = flow.shift_sigmas(sigmas, 3.0)
    # 3s / (1 + 2s): 0 -> 0, 0.25 -> 0.75/1.5, 0.5 -> 1.5/2, 1 -> 1
    assert torch.allclose(shifted, torch.tensor([0.0, 0.5, 0.75, 1.0]))
    assert torch.equal(flow.shift_sigmas(sigmas, 1.0), sigmas)
    with pytest.raises(ValueError, match="shift must be > 0"):
        flow.shift_sigmas(sigmas, 0.0)


def test_resolution_dependent_shift_endpoints() -> None:
    # Flux's calculate_shift: mu = 0.5 at 256 tokens, 1.15 at 4096 tokens, linear between.
    assert flow.resolution_dependent_shift(256) == pytest.approx(math.exp(0.5))
    assert flow.resolution_dependent_shift(4096) == pytest.approx(math.exp(1.15))
    assert flow.resolution_dependent_shift(2176) == pytest.approx(math.exp(0.825))


def test_auto_shift_wins_over_static_shift_and_nonpositive_shift_means_none() -> None:
    auto = flow.FlowSchedule(shift=3.0, auto_shift=True)
    assert flow.effective_shift(auto, 1024) == pytest.approx(flow.resolution_dependent_shift(1024))
    assert flow.effective_shift(flow.FlowSchedule(shift=3.0), 1024) == 3.0
    assert flow.effective_shift(flow.FlowSchedule(shift=0.0), 1024) is None
    assert flow.effective_shift(flow.FlowSchedule(shift=None), 1024) is None


def test_larger_images_get_noisier_sigmas_under_auto_shift() -> None:
    schedule = flow.FlowSchedule(auto_shift=True)
    small = flow.sample_training_sigmas(
        4096, schedule, image_seq_len=256, generator=torch.Generator().manual_seed(0)
    )
    large = flow.sample_training_sigmas(
        4096, schedule, image_seq_len=4096, generator=torch.Generator().manual_seed(0)
    )
    assert large.mean() > small.mean()
    assert torch.all(large >= small)  # same draws, monotone shift


@pytest.mark.parametrize(
    ("sampling", "expected_mean"),
    [
        (flow.SigmaSampling(), 0.5),
        (flow.SigmaSampling(distribution="uniform"), 0.5),
        (flow.SigmaSampling(distribution="beta", beta_alpha=2.0, beta_beta=6.0), 0.25),
    ],
)
def test_sigma_distributions_are_in_range_seeded_and_have_expected_mean(
    sampling: flow.SigmaSampling, expected_mean: float
) -> None:
    first = flow.sample_sigmas(20000, sampling, generator=torch.Generator().manual_seed(1))
    again = flow.sample_sigmas(20000, sampling, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, again)
    assert first.dtype == torch.float32
    assert torch.all((first >= 0) & (first <= 1))
    assert first.mean().item() == pytest.approx(expected_mean, abs=0.01)


def test_sigmoid_scale_spreads_logit_normal() -> None:
    narrow = flow.sample_sigmas(
        10000, flow.SigmaSampling(sigmoid_scale=0.5), generator=torch.Generator().manual_seed(0)
    )
    wide = flow.sample_sigmas(
        10000, flow.SigmaSampling(sigmoid_scale=2.0), generator=torch.Generator().manual_seed(0)
    )
    assert wide.std() > narrow.std()


def test_noising_endpoints_and_target_direction() -> None:
    latents = torch.randn(2, 4, 3, 3)
    noise = torch.randn(2, 4, 3, 3)
    assert torch.allclose(flow.add_noise(latents, noise, torch.tensor([0.0, 1.0]))[0], latents[0])
    assert torch.allclose(flow.add_noise(latents, noise, torch.tensor([0.0, 1.0]))[1], noise[1])
    halfway = flow.add_noise(latents, noise, torch.tensor([0.5, 0.5]))
    assert torch.allclose(halfway, (latents + noise) / 2)
    target = flow.velocity_target(latents, noise)
    assert torch.allclose(target, noise - latents)
    assert torch.allclose(flow.velocity_target(latents, noise, direction=-1.0), latents - noise)
    # Integrating the velocity from the noisy point recovers the data: x0 = x_sigma - sigma * v.
    sigmas = torch.tensor([0.3, 0.8])
    noisy = flow.add_noise(latents, noise, sigmas)
    assert torch.allclose(noisy - sigmas.view(2, 1, 1, 1) * target, latents, atol=1e-6)


def test_loss_is_float32_and_weighted() -> None:
    prediction = torch.ones(2, 3, dtype=torch.bfloat16)
    target = torch.zeros(2, 3, dtype=torch.bfloat16)
    loss = flow.flow_matching_loss(prediction, target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(1.0)
    weights = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert flow.flow_matching_loss(prediction, target, weights).item() == pytest.approx(1 / 6)
