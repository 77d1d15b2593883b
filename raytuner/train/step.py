"""One optimisation step of LoKr flow-matching training: plain PyTorch, no Ray.

The strategies (:mod:`raytuner.train.strategy`), the demo, the benchmarks and the tests all call
:func:`optimizer_step`. It takes the micro-batches of one global step on this worker
(``gradient_accumulation_steps`` of them), runs forward and backward on each, clips and steps the
optimiser. Across workers, the data-parallel strategy passes its ``DistributedDataParallel``
module's forward and ``no_sync`` (the gradients are averaged in the last micro-step's backward)
and a ``reduce_sum`` for the step's loss figures; on one process there is nothing to pass.

Regularisation batches (``is_regularisation_data``) are trained as SimpleTuner trains them for
adapters: the target is the base model's own prediction for the same noisy latents with the
adapter switched off (its multiplier set to 0), so the adapter learns to leave those images as the
base model would draw them, instead of learning them as ordinary data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from lycoris import LycorisNetwork

from raytuner import flow
from raytuner.models.base import ConditioningBatch, Denoiser, ModelFamily
from raytuner.precision import autocast

# Sums a tensor over the workers (an all-reduce), in place or returned.
ReduceSum = Callable[[torch.Tensor], torch.Tensor]
# The float32 loss of one micro-batch, with the graph for its backward pass.
LossOf = Callable[["MicroBatch"], torch.Tensor]


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


@dataclass
class LossTally:
    """The step's loss figures, summed per kind (ordinary, regularisation) over its micro-batches.

    Every strategy keeps its step's numbers here, so the means a step reports are computed once.
    """

    losses: torch.Tensor = field(default_factory=lambda: torch.zeros(2, dtype=torch.float64))
    counts: torch.Tensor = field(default_factory=lambda: torch.zeros(2, dtype=torch.float64))

    def add(self, loss: torch.Tensor, *, is_regularisation: bool) -> None:
        slot = int(is_regularisation)
        self.losses[slot] += float(loss.detach())
        self.counts[slot] += 1

    def result(
        self, grad_norm: float, *, reduce_sum: ReduceSum | None = None, device: torch.device
    ) -> StepResult:
        """Means over every micro-batch of every worker (``reduce_sum`` sums over the workers)."""
        losses, counts = self.losses, self.counts
        if reduce_sum is not None:
            totals = reduce_sum(torch.cat([losses, counts]).to(device=device, dtype=torch.float32))
            totals = totals.double().cpu()
            losses, counts = totals[:2], totals[2:]
        mean = (losses / counts.clamp(min=1e-12)).tolist()
        return StepResult(
            loss=float(losses.sum() / counts.sum()),
            grad_norm=grad_norm,
            regularisation_loss=mean[1] if counts[1] > 0 else None,
        )


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


def accumulate(
    loss_of: LossOf,
    micro_batches: Sequence[MicroBatch],
    backward: Callable[[torch.Tensor], None],
    *,
    no_sync: Callable[[], contextlib.AbstractContextManager[object]] | None = None,
) -> LossTally:
    """Forward and ``backward`` on each micro-batch; every one but the last inside ``no_sync``."""
    if not micro_batches:
        raise ValueError("a training step needs at least one micro-batch")
    tally = LossTally()
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        with contextlib.nullcontext() if no_sync is None or last else no_sync():
            loss = loss_of(batch)
            backward(loss)
        tally.add(loss, is_regularisation=batch.is_regularisation)
    return tally


def clip_and_step(
    parameters: Sequence[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    *,
    max_grad_norm: float | None,
    grad_clip_method: str,
) -> float:
    """Clip (by ``grad_clip_method``), step the optimiser; the gradient norm before clipping."""
    for parameter in parameters:
        if parameter.grad is None:  # an adapted layer this step never ran: a zero gradient
            parameter.grad = torch.zeros_like(parameter, memory_format=torch.preserve_format)
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    if max_grad_norm is not None and max_grad_norm > 0:
        if grad_clip_method == "norm":
            torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        else:
            torch.nn.utils.clip_grad_value_(parameters, max_grad_norm)
    optimizer.step()
    return float(grad_norm)


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
    loss_of: LossOf | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager[object]] | None = None,
    reduce_sum: ReduceSum | None = None,
) -> StepResult:
    """Accumulate gradients over ``micro_batches``, clip, step.

    ``loss_of`` replaces the plain forward (the data-parallel strategy passes its DDP module, whose
    backward averages the gradients over the workers); ``reduce_sum`` sums the loss figures.
    """

    def plain(batch: MicroBatch) -> torch.Tensor:
        return micro_batch_loss(
            family, transformer, network, batch, schedule, mixed_precision=mixed_precision
        )

    def backward(loss: torch.Tensor) -> None:
        (loss / len(micro_batches)).backward()

    optimizer.zero_grad(set_to_none=True)
    tally = accumulate(loss_of or plain, micro_batches, backward, no_sync=no_sync)
    grad_norm = clip_and_step(
        parameters, optimizer, max_grad_norm=max_grad_norm, grad_clip_method=grad_clip_method
    )
    return tally.result(grad_norm, reduce_sum=reduce_sum, device=parameters[0].device)


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
