"""One optimisation step of LoKr flow-matching training, shared by the loop, the demo and the tests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from raytuner import flow
from raytuner.models.base import ConditioningBatch, ModelFamily


@dataclass(frozen=True, kw_only=True)
class StepResult:
    loss: float
    grad_norm: float


def train_step(
    family: ModelFamily,
    transformer: torch.nn.Module,
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
    """Forward, backward, clip (SimpleTuner's ``value`` or ``norm``), optimiser step."""
    optimizer.zero_grad(set_to_none=True)
    output = family.training_loss(transformer, latents, conditioning, schedule, generator=generator)
    output.loss.backward()
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in adapter_parameters if p.grad is not None])
    if max_grad_norm is not None and max_grad_norm > 0:
        if grad_clip_method == "norm":
            torch.nn.utils.clip_grad_norm_(adapter_parameters, max_grad_norm)
        else:
            torch.nn.utils.clip_grad_value_(adapter_parameters, max_grad_norm)
    optimizer.step()
    return StepResult(loss=float(output.loss.detach()), grad_norm=float(grad_norm))
