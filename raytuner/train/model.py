"""The model a worker trains: the family's base transformer, frozen, with its LyCORIS network.

Built the same way on every worker (the adapter is seeded), before any strategy wraps it. The
base is loaded where the strategy keeps it (``base_device``), quantised first when
``base_model_precision`` asks for it (a transform of the base, whichever strategy trains it), and
the adapter trains in float32 on the worker's device whatever the base's precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.modeling_utils import ModelMixin
from lycoris import LycorisNetwork

from raytuner.adapters import AdapterReport, build_adapter
from raytuner.config import RunConfig
from raytuner.models.base import ModelFamily
from raytuner.models.registry import get_family
from raytuner.quantize import adapter_spec, quantize_base, quantize_load_device
from raytuner.train.compile import compile_transformer
from raytuner.upstream import BlockCheckpointing, supports_gradient_checkpointing


@dataclass(frozen=True, kw_only=True)
class AdaptedModel:
    family: ModelFamily
    transformer: ModelMixin
    network: LycorisNetwork
    parameters: list[torch.nn.Parameter]  # the adapter's trainable tensors
    report: AdapterReport
    # gradient_checkpointing_interval > 1: which blocks are checkpointed, and how many calls each way.
    checkpointing: BlockCheckpointing | None = None


def build_model(run: RunConfig, *, device: torch.device, base_device: torch.device) -> AdaptedModel:
    training = run.training
    base_dtype = torch.bfloat16 if training.model.mixed_precision == "bf16" else torch.float32
    family_class = get_family(training.model.model_family)
    family = family_class(
        family_class.resolve_model_path(
            training.model.model_flavour, training.model.pretrained_model_name_or_path
        ),
        revision=training.model.revision,
        device=device,
        dtype=base_dtype,
    )
    # base_model_precision: quantised before the adapter is built, on the CPU first when
    # quantize_via is "cpu" (raytuner/quantize.py).
    transformer = quantize_base(
        family.load_transformer(device=quantize_load_device(training.model, base_device)),
        training.model,
        device=base_device,
    ).requires_grad_(False)
    family.apply_attention(transformer, training.memory.attention_mechanism)
    checkpointing = None
    if training.memory.gradient_checkpointing and supports_gradient_checkpointing(transformer):
        checkpointing = family.enable_gradient_checkpointing(
            transformer, interval=training.memory.gradient_checkpointing_interval
        )
    transformer.train()
    assert run.lycoris is not None, "the config check requires a lycoris_config"
    network, report = build_adapter(
        transformer,
        adapter_spec(run.lycoris, training.model),
        module_aliases=family.module_aliases,
        seed=run.seed,
    )
    network.to(device=device, dtype=torch.float32)
    compile_transformer(transformer, training.memory)  # dynamo_backend; traced at the first forward
    parameters = [p for p in network.parameters() if p.requires_grad]
    return AdaptedModel(
        family=family,
        transformer=transformer,
        network=network,
        parameters=parameters,
        report=report,
        checkpointing=checkpointing,
    )
