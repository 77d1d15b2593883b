"""What the step, offload, DDP and GPU tests share: the tiny Cosmos2 model with a seeded LoKr,
four synthetic samples, their micro-batches, and plain training steps on them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from lycoris import LycorisNetwork

from raytuner import flow
from raytuner.adapters import AdapterReport, build_adapter
from raytuner.config.lycoris import parse_lycoris
from raytuner.config.training import TrainingConfig
from raytuner.data.synthetic import synthetic_images, to_pixels
from raytuner.models.base import ModelFamily
from raytuner.models.registry import get_family
from raytuner.train.model import AdaptedModel
from raytuner.train.step import MicroBatch, optimizer_step

SCHEDULE = flow.FlowSchedule(shift=3.0)
LOKR = parse_lycoris(
    {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 4},
    where="test",
    strict=True,
).config


@dataclass
class Setup:
    family: ModelFamily
    transformer: torch.nn.Module
    network: LycorisNetwork
    parameters: list[torch.nn.Parameter]
    latents: torch.Tensor
    conditioning: list
    report: AdapterReport | None = None

    def model(self) -> AdaptedModel:
        """The setup as the model a strategy prepares."""
        assert self.report is not None
        return AdaptedModel(
            family=self.family,
            transformer=self.transformer,  # type: ignore[arg-type]
            network=self.network,
            parameters=self.parameters,
            report=self.report,
        )


def make_setup(
    model: Path,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 3,
    family_name: str = "cosmos2image",
    num_layers: int | None = None,
) -> Setup:
    """The tiny checkpoint of ``family_name`` with a seeded LoKr; ``num_layers`` rebuilds its
    transformer with that many blocks, seeded (the tiny checkpoints have two)."""
    family = get_family(family_name)(model, dtype=dtype)
    items = synthetic_images(4, width=64, height=64, seed=1)
    latents = family.encode_images(to_pixels([item.image for item in items]))
    conditioning = family.encode_prompts([item.caption for item in items])
    transformer = family.load_transformer()
    if num_layers is not None:
        torch.manual_seed(seed)
        config = {**transformer.config, "num_layers": num_layers}
        transformer = type(transformer).from_config(config).to(dtype=dtype)
    transformer.requires_grad_(False)
    assert LOKR is not None
    network, report = build_adapter(transformer, LOKR, module_aliases=family.module_aliases, seed=seed)
    network.to(dtype=torch.float32)
    parameters = [p for p in network.parameters() if p.requires_grad]
    return Setup(family, transformer, network, parameters, latents, conditioning, report)


def micro(setup: Setup, start: int, stop: int, *, regularisation: bool = False) -> MicroBatch:
    return MicroBatch(
        latents=setup.latents[start:stop],
        conditioning=setup.family.collate_conditioning(setup.conditioning[start:stop]),
        generators=[torch.Generator().manual_seed(100 + i) for i in range(start, stop)],
        is_regularisation=regularisation,
    )


def perturb(setup: Setup) -> None:
    """Give the adapter a visible effect (a fresh LoKr adds nothing: one factor starts at zero)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in setup.parameters:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def training(**keys: object) -> TrainingConfig:
    """A Cosmos2 training config with group offload on, and ``keys``."""
    values = {
        "model_family": "cosmos2image",
        "data_backend_config": Path("unused.json"),
        "enable_group_offload": True,
    }
    return TrainingConfig.from_options({**values, **keys})


def train_steps(setup: Setup, steps: int, *, lr: float = 3e-2) -> list[float]:
    """Plain AdamW steps on the first four samples; their losses."""
    optimizer = torch.optim.AdamW(setup.parameters, lr=lr)
    losses = []
    for _ in range(steps):
        result = optimizer_step(
            setup.family,
            setup.transformer,
            setup.network,
            setup.parameters,
            optimizer,
            [micro(setup, 0, 4)],
            SCHEDULE,
        )
        losses.append(result.loss)
    return losses
