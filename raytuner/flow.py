"""Flow-matching math: sigma sampling, schedule shift, noising, target and loss.

Plain tensor functions, no Ray and no config objects, so every piece is unit-tested on CPU.

Conventions (SimpleTuner's, which follow SD3 and Flux):

* ``sigma`` is the *noise fraction* in ``[0, 1]``: ``x_sigma = (1 - sigma) * x0 + sigma * noise``;
  ``sigma = 1`` is pure noise.
* The velocity target is ``noise - x0``. A family whose transformer was trained with the opposite
  direction (OmniGen integrates from noise at ``t = 0`` to data at ``t = 1``) multiplies it by -1.
* Sigma sampling mirrors ``simpletuner/helpers/models/common.py::sample_flow_sigmas``: logit-normal
  (``sigmoid(flow_sigmoid_scale * N(0, 1))``) by default, uniform or Beta on request; the schedule
  shift then follows ``simpletuner/helpers/training/custom_schedule.py::apply_flow_schedule_shift``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from raytuner.upstream import standard_gamma

SigmaDistribution = Literal["logit_normal", "uniform", "beta"]


@dataclass(frozen=True, kw_only=True)
class SigmaSampling:
    """How training sigmas are drawn before any shift."""

    distribution: SigmaDistribution = "logit_normal"
    sigmoid_scale: float = 1.0  # flow_sigmoid_scale
    beta_alpha: float = 2.0  # flow_beta_schedule_alpha
    beta_beta: float = 2.0  # flow_beta_schedule_beta


@dataclass(frozen=True, kw_only=True)
class ResolutionShift:
    """Parameters of the resolution-dependent shift (the scheduler's dynamic-shifting config).

    The defaults are ``FlowMatchEulerDiscreteScheduler``'s, which SimpleTuner reads from the
    model's scheduler config.
    """

    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15


@dataclass(frozen=True, kw_only=True)
class FlowSchedule:
    """A training sigma schedule: the distribution plus an optional static or automatic shift."""

    sampling: SigmaSampling = SigmaSampling()
    shift: float | None = None  # flow_schedule_shift; None or <= 0 means "no static shift"
    auto_shift: bool = False  # flow_schedule_auto_shift
    resolution_shift: ResolutionShift = ResolutionShift()


def sample_sigmas(
    batch_size: int,
    sampling: SigmaSampling,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Draw ``batch_size`` unshifted sigmas in ``(0, 1)`` as float32."""
    if sampling.distribution == "logit_normal":
        normal = torch.randn(batch_size, generator=generator, device=device, dtype=torch.float32)
        return torch.sigmoid(sampling.sigmoid_scale * normal)
    if sampling.distribution == "uniform":
        return torch.rand(batch_size, generator=generator, device=device, dtype=torch.float32)
    if sampling.distribution == "beta":
        # torch.distributions cannot take a generator; Beta(a, b) from two seeded Gammas instead.
        alpha = torch.full((batch_size,), float(sampling.beta_alpha), device=device)
        beta = torch.full((batch_size,), float(sampling.beta_beta), device=device)
        gamma_a = standard_gamma(alpha, generator=generator)
        gamma_b = standard_gamma(beta, generator=generator)
        return (gamma_a / (gamma_a + gamma_b)).to(torch.float32)
    raise ValueError(
        f"unknown sigma distribution {sampling.distribution!r} (known: logit_normal, uniform, beta)"
    )


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift: ``shift * s / (1 + (shift - 1) * s)``; ``shift > 1`` favours noisier sigmas."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return (sigmas * shift) / (1 + (shift - 1) * sigmas)


def resolution_dependent_shift(image_seq_len: int, params: ResolutionShift = ResolutionShift()) -> float:
    """``exp(mu)`` where ``mu`` grows linearly with the number of image tokens (Flux's ``calculate_shift``)."""
    slope = (params.max_shift - params.base_shift) / (params.max_image_seq_len - params.base_image_seq_len)
    intercept = params.base_shift - slope * params.base_image_seq_len
    return math.exp(image_seq_len * slope + intercept)


def effective_shift(schedule: FlowSchedule, image_seq_len: int) -> float | None:
    """The shift applied for images of ``image_seq_len`` tokens, or ``None`` for no shift.

    As in SimpleTuner, auto-shift wins when both are set (its safety check zeroes the static
    shift), and a static shift of 0 or less means "none".
    """
    if schedule.auto_shift:
        return resolution_dependent_shift(image_seq_len, schedule.resolution_shift)
    if schedule.shift is not None and schedule.shift > 0:
        return schedule.shift
    return None


def sample_training_sigmas(
    batch_size: int,
    schedule: FlowSchedule,
    *,
    image_seq_len: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Sample sigmas and apply the schedule's shift for images of ``image_seq_len`` tokens."""
    sigmas = sample_sigmas(batch_size, schedule.sampling, generator=generator, device=device)
    shift = effective_shift(schedule, image_seq_len)
    return sigmas if shift is None else shift_sigmas(sigmas, shift)


def per_sample(values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """One value per sample ``[B]``, shaped ``[B, 1, ...]`` to broadcast over ``reference``."""
    return values.reshape(values.shape[0], *([1] * (reference.ndim - 1)))


def add_noise(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Interpolate ``(1 - sigma) * latents + sigma * noise`` per sample, in float32."""
    sigmas = per_sample(sigmas.to(torch.float32), latents)
    return (1.0 - sigmas) * latents.to(torch.float32) + sigmas * noise.to(torch.float32)


def velocity_target(latents: torch.Tensor, noise: torch.Tensor, *, direction: float = 1.0) -> torch.Tensor:
    """``direction * (noise - latents)``: +1 for noise-ward models, -1 for data-ward ones (OmniGen)."""
    return direction * (noise.to(torch.float32) - latents.to(torch.float32))


def flow_matching_loss(
    prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error in float32, optionally weighted per element (broadcastable weights)."""
    squared_error = (prediction.to(torch.float32) - target.to(torch.float32)) ** 2
    if weights is not None:
        squared_error = squared_error * weights.to(torch.float32)
    return squared_error.mean()


def loss_mask_weights(mask: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """Per-sample loss masks ``[B, h, w]`` (0 ignore .. 1 learn, on the latent grid) as loss weights.

    The mask is shaped to broadcast over the latent channels (and Cosmos2's frame axis), so
    :func:`flow_matching_loss` weights every channel of a latent pixel alike. The mean then runs
    over all elements, masked-out ones included, as SimpleTuner's masked loss does: a mostly
    black mask makes a smaller loss, not a re-normalised one.
    """
    if (
        mask.ndim != 3
        or mask.shape[0] != latents.shape[0]
        or tuple(mask.shape[1:]) != tuple(latents.shape[-2:])
    ):
        raise ValueError(
            f"loss mask of shape {tuple(mask.shape)} does not match latents of shape {tuple(latents.shape)}; "
            "expected [batch, latent height, latent width]"
        )
    view = (mask.shape[0], *([1] * (latents.ndim - 3)), *mask.shape[1:])
    return mask.to(device=latents.device, dtype=torch.float32).reshape(view)
