"""One optimisation step of LoKr flow-matching training: plain PyTorch, no Ray.

The loop, the demo, the benchmarks and the tests all call :func:`optimizer_step`. It takes the
micro-batches of one global step on this worker (``gradient_accumulation_steps`` of them), runs
forward and backward on each, averages the adapter gradients over the workers through the
``reduce_mean`` it is given (``None`` on one process), clips and steps the optimiser.

Regularisation batches (``is_regularisation_data``) are trained as SimpleTuner trains them for
adapters: the target is the base model's own prediction for the same noisy latents with the
adapter switched off (its multiplier set to 0), so the adapter learns to leave those images as the
base model would draw them, instead of learning them as ordinary data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from lycoris import LycorisNetwork
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from raytuner import flow
from raytuner.models.base import ConditioningBatch, Denoiser, ModelFamily
from raytuner.precision import autocast

# Averages a flat tensor over the workers (all-reduce sum / world size), in place or returned.
ReduceMean = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class MicroBatch:
    """One worker's share of one accumulation micro-step."""

    latents: torch.Tensor
    conditioning: ConditioningBatch
    # One generator per sample (seeded by seed, sample key and step), or one for the batch.
    generators: torch.Generator | Sequence[torch.Generator] | None = None
    is_regularisation: bool = False
    # Masked loss: ``[B, h, w]`` weights on the latent grid (1 learn, 0 ignore), or None.
    loss_mask: torch.Tensor | None = None


@dataclass(frozen=True, kw_only=True)
class StepResult:
    """Means over every micro-batch of every worker (``regularisation_loss`` only where present)."""

    loss: float
    grad_norm: float
    regularisation_loss: float | None = None


@contextlib.contextmanager
def adapter_disabled(network: LycorisNetwork) -> Iterator[None]:
    """The base model alone: the adapter's multiplier is 0 inside the block (SimpleTuner's way)."""
    multiplier = float(getattr(network, "multiplier", 1.0))
    network.set_multiplier(0.0)
    try:
        yield
    finally:
        network.set_multiplier(multiplier)


def micro_batch_loss(
    family: ModelFamily,
    transformer: Denoiser,
    network: LycorisNetwork | None,
    batch: MicroBatch,
    schedule: flow.FlowSchedule,
    *,
    mixed_precision: str = "no",
) -> torch.Tensor:
    """The float32 flow-matching loss of one micro-batch (regularisation: against the base model).

    The family's :meth:`~raytuner.models.base.ModelFamily.loss_weight` weights each sample by its
    noise level and a ``loss_mask`` each latent pixel, in ordinary and regularisation batches
    alike (one loss function for both).
    """
    latents = batch.latents.to(family.device, torch.float32)
    weights = None if batch.loss_mask is None else flow.loss_mask_weights(batch.loss_mask, latents)
    if not batch.is_regularisation:
        with autocast(family.device, mixed_precision):
            return family.training_loss(
                transformer,
                latents,
                batch.conditioning,
                schedule,
                generator=batch.generators,
                mask_weights=weights,
            ).loss
    if network is None:
        raise ValueError("a regularisation batch needs the adapter network, to switch it off")
    noise, sigmas = family.sample_noise_and_sigmas(latents, schedule, generator=batch.generators)
    noisy_latents = flow.add_noise(latents, noise, sigmas)
    with autocast(family.device, mixed_precision):
        with torch.no_grad(), adapter_disabled(network):
            target = family.predict(transformer, noisy_latents, sigmas, batch.conditioning).float()
        prediction = family.predict(transformer, noisy_latents, sigmas, batch.conditioning)
    return family.weighted_loss(prediction, target, sigmas, weights)


def optimizer_step(
    family: ModelFamily,
    transformer: Denoiser,
    network: LycorisNetwork | None,
    parameters: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[MicroBatch],
    schedule: flow.FlowSchedule,
    *,
    max_grad_norm: float | None = None,
    grad_clip_method: str = "value",
    mixed_precision: str = "no",
    reduce_mean: ReduceMean | None = None,
) -> StepResult:
    """Accumulate gradients over ``micro_batches``, average them over workers, clip, step."""
    if not micro_batches:
        raise ValueError("optimizer_step needs at least one micro-batch")
    optimizer.zero_grad(set_to_none=True)
    losses = torch.zeros(2, dtype=torch.float64)  # ordinary, regularisation
    counts = torch.zeros(2, dtype=torch.float64)
    for batch in micro_batches:
        loss = micro_batch_loss(
            family, transformer, network, batch, schedule, mixed_precision=mixed_precision
        )
        (loss / len(micro_batches)).backward()
        slot = int(batch.is_regularisation)
        losses[slot] += float(loss.detach())
        counts[slot] += 1

    gradients = [
        p.grad if p.grad is not None else torch.zeros_like(p, memory_format=torch.preserve_format)
        for p in parameters
    ]
    if reduce_mean is not None:
        # One collective for the gradients and the loss figures: the adapter is small, and one
        # all-reduce after the last micro-step is what DDP's no_sync() accumulation amounts to.
        device = gradients[0].device
        flat = _flatten_dense_tensors([g.float() for g in gradients])
        totals = torch.cat([losses, counts]).to(device=device, dtype=flat.dtype)
        reduced = reduce_mean(torch.cat([flat, totals]))
        flat, totals = reduced[: flat.numel()], reduced[flat.numel() :].double().cpu()
        losses, counts = totals[:2], totals[2:]
        for parameter, gradient in zip(parameters, _unflatten_dense_tensors(flat, gradients), strict=True):
            parameter.grad = gradient.to(parameter.dtype)
    else:
        for parameter, gradient in zip(parameters, gradients, strict=True):
            parameter.grad = gradient

    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    if max_grad_norm is not None and max_grad_norm > 0:
        if grad_clip_method == "norm":
            torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        else:
            torch.nn.utils.clip_grad_value_(parameters, max_grad_norm)
    optimizer.step()

    mean = (losses / counts.clamp(min=1e-12)).tolist()
    total = float(losses.sum() / counts.sum())
    return StepResult(
        loss=total, grad_norm=float(grad_norm), regularisation_loss=mean[1] if counts[1] > 0 else None
    )


def train_step(
    family: ModelFamily,
    transformer: Denoiser,
    adapter_parameters: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    latents: torch.Tensor,
    conditioning: ConditioningBatch,
    schedule: flow.FlowSchedule,
    *,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    max_grad_norm: float | None = None,
    grad_clip_method: str = "value",
) -> StepResult:
    """One ordinary batch on one process: :func:`optimizer_step` with a single micro-batch."""
    return optimizer_step(
        family,
        transformer,
        None,
        adapter_parameters,
        optimizer,
        [MicroBatch(latents=latents, conditioning=conditioning, generators=generator)],
        schedule,
        max_grad_norm=max_grad_norm,
        grad_clip_method=grad_clip_method,
    )
