"""Shared set-up of the parity tests: a tiny family with LoKr, fixed latents and text, and a
recorder of what the transformer is called with."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lycoris import LycorisNetwork

from raytuner import flow
from raytuner.adapters import build_adapter
from raytuner.config.lycoris import parse_lycoris
from raytuner.data.synthetic import synthetic_images, to_pixels
from raytuner.models.base import ConditioningBatch, ModelFamily, PromptConditioning
from raytuner.models.registry import get_family

LOKR = parse_lycoris(
    {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 4},
    where="parity test",
    strict=True,
).config
DRAWS = 10_000  # timestep draws compared per distribution


@dataclass
class TinyRun:
    """A float32 tiny family with a perturbed LoKr adapter, and a fixed batch of latents and text."""

    family: ModelFamily
    transformer: torch.nn.Module
    network: LycorisNetwork
    latents: torch.Tensor
    captions: list[str]
    prompts: list[PromptConditioning]
    conditioning: ConditioningBatch

    def conditioning_of(self, index: int) -> ConditioningBatch:
        return self.family.collate_conditioning([self.prompts[index]])

    def generators(self, start: int = 0) -> list[torch.Generator]:
        """Fresh per-sample generators: the same noise and sigmas each time they are made."""
        return [torch.Generator().manual_seed(1000 + start + i) for i in range(self.latents.shape[0])]


def tiny_run(family_name: str, model: Path, *, batch: int = 3) -> TinyRun:
    family = get_family(family_name)(model)
    items = synthetic_images(batch, width=64, height=64, seed=7)
    latents = family.encode_images(to_pixels([item.image for item in items]))
    captions = [item.caption for item in items]
    prompts = family.encode_prompts(captions)
    conditioning = family.collate_conditioning(prompts)
    transformer = family.load_transformer().requires_grad_(False).eval()
    assert LOKR is not None
    network, _ = build_adapter(transformer, LOKR, module_aliases=family.module_aliases, seed=5)
    network.to(dtype=torch.float32)
    # A fresh LoKr adds nothing (one factor starts at zero): give it a visible effect, so the
    # regularisation target (adapter off) differs from the prediction (adapter on).
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in network.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return TinyRun(family, transformer, network, latents, captions, prompts, conditioning)


@dataclass
class TransformerCalls:
    """The keyword arguments and outputs of every transformer call inside a ``with`` block."""

    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)


@contextmanager
def recording(transformer: torch.nn.Module) -> Iterator[TransformerCalls]:
    calls = TransformerCalls()

    def before(_module: torch.nn.Module, _args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.inputs.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    def after(_module: torch.nn.Module, _args: tuple[Any, ...], _kwargs: dict[str, Any], output: Any) -> None:
        calls.outputs.append(output[0].detach().clone())

    handles = [
        transformer.register_forward_pre_hook(before, with_kwargs=True),
        transformer.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class PerSampleLosses:
    """raytuner's own training loss of each sample alone, with the draws and calls behind it."""

    noise: torch.Tensor
    sigmas: torch.Tensor  # raytuner's noise fractions
    losses: torch.Tensor  # [B]
    calls: TransformerCalls  # one transformer call per sample


def per_sample_losses(run: TinyRun, schedule: flow.FlowSchedule) -> PerSampleLosses:
    """``ModelFamily.training_loss`` on each sample alone, with the generators the batch would use."""
    family = run.family
    noise, sigmas = family.sample_noise_and_sigmas(run.latents, schedule, generator=run.generators())
    generators = run.generators()
    with recording(run.transformer) as calls:
        losses = [
            family.training_loss(
                run.transformer,
                run.latents[i : i + 1],
                run.conditioning_of(i),
                schedule,
                generator=[generators[i]],
            ).loss
            for i in range(len(generators))
        ]
    return PerSampleLosses(noise=noise, sigmas=sigmas, losses=torch.stack(losses), calls=calls)


def expanded_latents(single: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` views of one latent (no memory): enough for a family to draw ``count`` sigmas."""
    return single.expand(count, *single.shape[1:])


def ks_statistic(first: torch.Tensor, second: torch.Tensor) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    from scipy.stats import ks_2samp

    return float(ks_2samp(first.double().numpy(), second.double().numpy()).statistic)


# Two samples of 10,000 from one distribution: the KS statistic exceeds 0.0276 with probability
# 0.001 (1.95 * sqrt(2 / 10,000)); the draws are seeded, so the tests are deterministic anyway.
SAME_DISTRIBUTION = 0.0276
