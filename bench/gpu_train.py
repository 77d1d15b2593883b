"""GPU benchmark: raytuner's per-worker LoKr training step against a bare diffusers + lycoris loop.

Both families at full size with random weights (nothing is downloaded): the transformer of
``nvidia/Cosmos-Predict2-2B-Text2Image`` and of ``Shitao/OmniGen-v1-diffusers``, built from the
configurations written below, in bfloat16, with each family's quickstart ``lycoris_config.json``
(``configs/<family>/``) and the quickstart's optimizer (``adamw_bf16``), learning rate and clipping,
on 1024 x 1024 images (128 x 128 latents, 4,096 image tokens). Text conditioning is random
tensors of the shapes the cache holds: Cosmos2's T5-11B states (1024 wide, zero-padded to 512
tokens, as the pipeline pads them) and OmniGen's templated prompt ids.

The matrix, at most 16 cells: family {cosmos2image, omnigen} x strategy {plain, group_offload}
x gradient checkpointing {off, on} x batch {1, the largest that fits}. Group offload is the
quickstarts' ``block_level`` with one block per group and CUDA streams where raytuner allows them
(not under gradient checkpointing). DeepSpeed is not in the matrix: on one GPU ZeRO has nothing
to shard, and a LoKr's optimizer state is small. Every cell is measured twice, one side after the
other, each on its own freshly built model:

* **raytuner**: what a Ray Train worker runs per step, without Ray: the family's collate, per-sample
  noise generators, ``raytuner.train.step.optimizer_step`` (flow-matching loss of the family,
  bf16 autocast, value clipping, AdamW), under ``OffloadedWeights.saving()`` with group offload;
  the model built as the worker builds it (``build_adapter``, ``plan_group_offload``,
  ``apply_group_offload``);
* **bare**: a hand-written diffusers + lycoris loop: ``create_lycoris``, forward with inputs built
  once, MSE against the flow target, backward, the same clipping, ``torch.optim.AdamW``; with group
  offload, diffusers' ``enable_group_offload`` plus the one saved-tensor hook any training loop over
  it needs (see :class:`FrozenWeightsForBackward`).

Figures per cell and side: median step time over the timed steps after warm-up (the host clock
between device synchronisations), samples/s, peak GPU memory (``torch.cuda.max_memory_allocated``
over the timed steps) and model FLOPs utilisation: FLOPs per sample counted by
``torch.utils.flop_counter.FlopCounterMode`` over one raytuner step at batch 1 without gradient
checkpointing (its matrix products and attention, forward and backward as executed: the frozen
base computes no weight gradients, the LoKr factors do; the recomputation of gradient
checkpointing is not model work, so it is not counted) times samples/s, over the GPU's dense
bf16 peak. The run also
times a large bf16 matrix product, so the result says how far that peak is reachable at all.

"The largest batch that fits" is searched per family, strategy and checkpointing on the raytuner
side: one step at batch 2 gives the memory per sample (peak at 2 minus peak at 1), which predicts
the largest batch in the GPU's memory; that batch, capped at ``--max-batch`` so that one short
GPU lease holds the whole matrix, is tried, and 3/4 of it after an out-of-memory error. The
search's steps and seconds are in the results. The bare side trains at the same batch.

    python bench/gpu_train.py --out DIR                 # the matrix, on the GPU (bench/gpu_run.sh)
    python bench/gpu_train.py --tiny --device cpu       # tiny random models, a few steps (tests)

Results: ``DIR/gpu_train.json`` (every figure, the machine, the search) and ``DIR/gpu_train.md``
(tables), rewritten after every measurement so a run stopped early keeps what it measured. Cells
that would start after ``--budget-s`` seconds are listed as skipped. Never run by the test suite
at full size; written up in bench/RESULTS.md with the GPU named.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
FAMILIES = ("cosmos2image", "omnigen")
STRATEGIES = ("plain", "group_offload")
DTYPE = torch.bfloat16
GIB = 1024**3

# nvidia/Cosmos-Predict2-2B-Text2Image, transformer/config.json: diffusers'
# scripts/convert_cosmos_to_diffusers.py, TRANSFORMER_CONFIGS["Cosmos-2.0-Diffusion-2B-Text2Image"].
COSMOS2_2B: dict[str, Any] = {
    "in_channels": 16,
    "out_channels": 16,
    "num_attention_heads": 16,
    "attention_head_dim": 128,
    "num_layers": 28,
    "mlp_ratio": 4.0,
    "text_embed_dim": 1024,
    "adaln_lora_dim": 256,
    "max_size": (128, 240, 240),
    "patch_size": (1, 2, 2),
    "rope_scale": (1.0, 4.0, 4.0),
    "concat_padding_mask": True,
    "extra_pos_embed_type": None,
}
# Shitao/OmniGen-v1-diffusers, transformer/config.json: OmniGenTransformer2DModel's defaults are
# OmniGen v1's sizes (its Phi-3 backbone: 32 layers, 3072 wide, 32 heads); the rotary scaling is
# Phi-3's LongRoPE ("su") table from OmniGen-v1's config, which diffusers' conversion copies over.
# The factors change the rotary frequencies only, never the cost of a step.
_OMNIGEN_LONG_FACTOR = [
    1.0299999713897705, 1.0499999523162842, 1.0499999523162842, 1.0799999237060547, 1.2299998998641968,
    1.2299998998641968, 1.2999999523162842, 1.4499999284744263, 1.5999999046325684, 1.6499998569488525,
    1.8999998569488525, 2.859999895095825, 3.68999981880188, 5.419999599456787, 5.489999771118164,
    5.489999771118164, 9.09000015258789, 11.579999923706055, 15.65999984741211, 15.769999504089355,
    15.789999961853027, 18.360000610351562, 21.989999771118164, 23.079999923706055, 30.009998321533203,
    32.35000228881836, 32.590003967285156, 35.56000518798828, 39.95000457763672, 53.840003967285156,
    56.20000457763672, 57.95000457763672, 59.29000473022461, 59.77000427246094, 59.920005798339844,
    61.190006256103516, 61.96000671386719, 62.50000762939453, 63.3700065612793, 63.48000717163086,
    63.48000717163086, 63.66000747680664, 63.850006103515625, 64.08000946044922, 64.760009765625,
    64.80001068115234, 64.81001281738281, 64.81001281738281,
]  # fmt: skip
_OMNIGEN_SHORT_FACTOR = [
    1.05, 1.05, 1.05, 1.1, 1.1, 1.1, 1.2500000000000002, 1.2500000000000002, 1.4000000000000004,
    1.4500000000000004, 1.5500000000000005, 1.8500000000000008, 1.9000000000000008, *[2.000000000000001] * 19,
    2.1000000000000005, 2.1000000000000005, 2.2, *[2.3499999999999996] * 4, 2.3999999999999995,
    2.3999999999999995, 2.6499999999999986, 2.6999999999999984, 2.8999999999999977, 2.9499999999999975,
    3.049999999999997, 3.049999999999997, 3.049999999999997,
]  # fmt: skip
OMNIGEN_V1: dict[str, Any] = {
    "in_channels": 4,
    "patch_size": 2,
    "hidden_size": 3072,
    "rms_norm_eps": 1e-5,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "intermediate_size": 8192,
    "num_layers": 32,
    "pad_token_id": 32000,
    "vocab_size": 32064,
    "max_position_embeddings": 131072,
    "original_max_position_embeddings": 4096,
    "rope_base": 10000,
    "rope_scaling": {
        "type": "su",
        "long_factor": _OMNIGEN_LONG_FACTOR,
        "short_factor": _OMNIGEN_SHORT_FACTOR,
    },
    "pos_embed_max_size": 192,
    "time_step_dim": 256,
    "flip_sin_to_cos": True,
    "downscale_freq_shift": 0,
    "timestep_activation_fn": "silu",
}
# --tiny: the same architectures at the sizes raytuner's tiny checkpoints use.
_TINY_HEAD_DIM = 16
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "cosmos2image": {
        **COSMOS2_2B,
        "num_attention_heads": 2,
        "attention_head_dim": _TINY_HEAD_DIM,
        "num_layers": 2,
        "text_embed_dim": 32,
        "adaln_lora_dim": 4,
        "max_size": (4, 64, 64),
    },
    "omnigen": {
        **OMNIGEN_V1,
        "hidden_size": 2 * _TINY_HEAD_DIM,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "num_layers": 2,
        "rope_scaling": {
            "type": "su",
            "long_factor": [1.0 + 8.0 * i for i in range(_TINY_HEAD_DIM // 2)],
            "short_factor": [1.0 + 0.25 * i for i in range(_TINY_HEAD_DIM // 2)],
        },
        "pos_embed_max_size": 64,
        "time_step_dim": 64,
    },
}
PIXELS_PER_LATENT = 8  # Wan VAE and SDXL VAE both downsample x8
LATENT_CHANNELS = {"cosmos2image": 16, "omnigen": 4}
COSMOS_PROMPT_TOKENS = 128  # a caption's T5 states before the family pads them to 512
OMNIGEN_PROMPT_TOKENS = 80  # OmniGen's chat template (about 20 ids) around a caption
# LyCORIS preset names as the quickstarts write them -> diffusers' class names, for the bare side
# (raytuner maps them through the family's module_aliases).
BARE_PRESET_CLASSES = {"FeedForward": "OmniGenFeedForward"}
# Dense bf16 tensor-core peaks by datasheet, TFLOP/s; --peak-tflops for any other GPU.
PEAK_BF16_TFLOPS = (("GH200", 989.4), ("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0))
# The batch-size prediction keeps this share of the GPU's memory as headroom for fragmentation.
MEMORY_HEADROOM = 0.08


# ---- set-up ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The quickstart settings a side trains with (configs/<family>/config.json)."""

    family: str
    learning_rate: float
    max_grad_norm: float
    grad_clip_method: str
    flow_schedule_shift: float
    flow_schedule_auto_shift: bool
    lycoris: dict[str, Any]


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")


def quickstart_settings(family: str) -> Settings:
    config = json.loads((CONFIGS / family / "config.json").read_text())
    return Settings(
        family=family,
        learning_rate=float(config["learning_rate"]),
        # A key left out has SimpleTuner's default, as when raytuner reads the file.
        max_grad_norm=float(config.get("max_grad_norm", 2.0)),
        grad_clip_method=str(config.get("grad_clip_method", "value")),
        flow_schedule_shift=float(config.get("flow_schedule_shift", 3.0)),
        flow_schedule_auto_shift=_flag(config.get("flow_schedule_auto_shift", False)),
        lycoris=json.loads((CONFIGS / family / "lycoris_config.json").read_text()),
    )


@dataclass(frozen=True)
class Cell:
    family: str
    strategy: str
    checkpointing: bool


@dataclass
class Bench:
    """What every measurement shares: arguments, device, configs, the results so far."""

    args: argparse.Namespace
    device: torch.device
    configs: dict[str, dict[str, Any]]
    started: float = field(default_factory=time.monotonic)
    results: dict[str, Any] = field(default_factory=dict)

    def over_budget(self) -> bool:
        return time.monotonic() - self.started > self.args.budget_s

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def raytuner_options(family: str, settings: Settings) -> dict[str, Any]:
    """The config.json options of the raytuner side of the bench: what both benches train with."""
    return dict(
        model_family=family,
        data_backend_config=Path("multidatabackend.json"),  # read by the cache, never here
        optimizer="adamw_bf16",
        learning_rate=settings.learning_rate,
        max_grad_norm=settings.max_grad_norm,
        grad_clip_method=settings.grad_clip_method,
        flow_schedule_shift=settings.flow_schedule_shift,
        flow_schedule_auto_shift=settings.flow_schedule_auto_shift,
        mixed_precision="bf16",
    )


def build_transformer(bench: Bench, family: str, *, on: torch.device, seed: int) -> torch.nn.Module:
    """The family's transformer with random weights, in bf16, on ``on``.

    Built on the GPU when there is one: a 2-4 B parameter model initialises there in about a second
    and in minutes on the CPU. Group offload then moves it to the CPU, where its weights wait.
    """
    from diffusers import CosmosTransformer3DModel, OmniGenTransformer2DModel

    transformer_class = {"cosmos2image": CosmosTransformer3DModel, "omnigen": OmniGenTransformer2DModel}[
        family
    ]
    torch.manual_seed(seed)
    with torch.device(bench.device):
        model = transformer_class(**bench.configs[family])
    # nn.Module.to, not ModelMixin.to: the latter warns about the modules kept in float32, which
    # are restored next, as from_pretrained(torch_dtype=...) keeps them.
    torch.nn.Module.to(model, device=on, dtype=DTYPE)
    for keep in getattr(model, "_keep_in_fp32_modules", None) or ():
        for name, module in model.named_modules():
            if keep in name.split("."):
                module.float()
    return model.requires_grad_(False)


@dataclass
class Batch:
    """One batch as the cache would hand it over: latents on the device, per-prompt conditioning."""

    latents: torch.Tensor
    prompts: list[dict[str, torch.Tensor]]

    @property
    def size(self) -> int:
        return self.latents.shape[0]


def make_batch(bench: Bench, family: str, size: int, *, seed: int) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    edge = bench.args.pixels // PIXELS_PER_LATENT
    # Cosmos2 latents keep the Wan VAE's frame axis: one frame per image.
    frames = (1,) if family == "cosmos2image" else ()
    shape = (size, LATENT_CHANNELS[family], *frames, edge, edge)
    latents = torch.randn(shape, generator=generator).to(bench.device)
    if family == "cosmos2image":
        width = bench.configs[family]["text_embed_dim"]
        prompts = [
            {"prompt_embeds": torch.randn(COSMOS_PROMPT_TOKENS, width, generator=generator)}
            for _ in range(size)
        ]
    else:
        prompts = [
            {"input_ids": torch.randint(3, 32000, (OMNIGEN_PROMPT_TOKENS,), generator=generator)}
            for _ in range(size)
        ]
    return Batch(latents=latents, prompts=prompts)


class Side:
    """One way of training a cell's model; ``step`` runs one optimiser step and returns its loss."""

    name: str
    optimizer: torch.optim.Optimizer
    parameters: list[torch.nn.Parameter]
    notes: list[str]
    use_stream: bool | None = None  # group offload's CUDA streams; None without group offload

    def prepare(self, batch: Batch) -> Any:
        raise NotImplementedError

    def step(self, prepared: Any, index: int) -> float:
        raise NotImplementedError

    def checkpointing_off(self) -> contextlib.AbstractContextManager[None]:
        """Gradient checkpointing switched off inside the block (to count model FLOPs)."""
        raise NotImplementedError

    def close(self) -> None:
        """Drop the model, adapter and optimizer (diffusers' hooks hold cycles: gc frees them)."""
        vars(self).clear()


# ---- raytuner's step -------------------------------------------------------------------------------


class RaytunerSide(Side):
    """The model and step as a raytuner Ray Train worker builds and runs them (raytuner/train/loop.py)."""

    name = "raytuner"

    def __init__(self, bench: Bench, cell: Cell, settings: Settings) -> None:
        from raytuner.adapters import build_adapter
        from raytuner.config.lycoris import parse_lycoris
        from raytuner.config.training import TrainingConfig
        from raytuner.models.registry import get_family
        from raytuner.train.offload import (
            OFFLOAD_DEVICE,
            OffloadedWeights,
            apply_group_offload,
            plan_group_offload,
        )
        from raytuner.train.optim import build_optimizer
        from raytuner.train.schedule import flow_schedule_from_config

        self.bench = bench
        offload = cell.strategy == "group_offload"
        self.training = TrainingConfig.from_options(
            dict(
                **raytuner_options(cell.family, settings),
                gradient_checkpointing=cell.checkpointing,
                enable_group_offload=offload,
                group_offload_type="block_level",
                group_offload_blocks_per_group=1,
                group_offload_use_stream=True,
            )
        )
        spec = parse_lycoris(
            settings.lycoris, where=f"configs/{cell.family}/lycoris_config.json", strict=True
        )
        assert spec.config is not None, spec.problems
        device = bench.device
        self.family = get_family(cell.family)("random weights, no checkpoint", device=device, dtype=DTYPE)
        self.transformer = build_transformer(
            bench, cell.family, on=OFFLOAD_DEVICE if offload else device, seed=bench.args.seed
        )
        if cell.checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.transformer.train()
        self.network, report = build_adapter(
            self.transformer, spec.config, module_aliases=self.family.module_aliases, seed=bench.args.seed
        )
        self.network.to(device=device, dtype=torch.float32)
        self.notes = [report.summary(), *report.warnings]
        self.saving: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext
        self.use_stream: bool | None = None
        if offload:
            plan = plan_group_offload(self.training.memory, device=device, run_name="gpu-bench", rank=0)
            assert plan is not None
            apply_group_offload(self.transformer, plan, onload_device=device)
            self.saving = OffloadedWeights(self.transformer, onload_device=device).saving
            self.use_stream = plan.use_stream
            self.notes.extend(plan.notes)
        self.parameters = [p for p in self.network.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.parameters, self.training.optimization)
        self.schedule = flow_schedule_from_config(self.training.flow)

    def prepare(self, batch: Batch) -> Batch:
        return batch  # the worker collates per step: that cost is part of its step

    def step(self, prepared: Batch, index: int) -> float:
        from raytuner.batches.plan import sample_generators
        from raytuner.train.step import MicroBatch, optimizer_step

        size = prepared.size
        micro = MicroBatch(
            latents=prepared.latents,
            conditioning=self.family.collate_conditioning(prepared.prompts),
            # Seeded per sample and step, as the epoch plan seeds them.
            generators=sample_generators([self.bench.args.seed + index * size + i for i in range(size)]),
        )
        with self.saving():
            result = optimizer_step(
                self.family,
                self.transformer,
                self.network,
                self.parameters,
                self.optimizer,
                [micro],
                self.schedule,
                max_grad_norm=self.training.optimization.max_grad_norm,
                grad_clip_method=self.training.optimization.grad_clip_method,
                mixed_precision=self.training.model.mixed_precision,
            )
        return result.loss

    @contextlib.contextmanager
    def checkpointing_off(self) -> Iterator[None]:
        was_on = bool(getattr(self.transformer, "gradient_checkpointing", False))
        if was_on:
            self.transformer.disable_gradient_checkpointing()
        try:
            yield
        finally:
            if was_on:
                self.transformer.enable_gradient_checkpointing()


# ---- the bare loop ---------------------------------------------------------------------------------


class FrozenWeightsForBackward:
    """The one addition a training loop over diffusers' group offload needs.

    diffusers' hooks move a group's weights back to the CPU (``param.data = …``) as soon as the
    group has run. Autograd keeps the frozen weights it needs for backward by reference, so it
    would read the CPU copy there. Saving such a weight as the parameter itself and copying its
    data to the GPU when backward asks keeps the gradients right.
    """

    def __init__(self, transformer: torch.nn.Module, device: torch.device) -> None:
        self.frozen = {id(p) for p in transformer.parameters() if not p.requires_grad}
        self.device = device

    def _pack(self, tensor: torch.Tensor) -> Any:
        if isinstance(tensor, torch.nn.Parameter) and id(tensor) in self.frozen:
            return ("frozen", tensor)
        return tensor

    def _unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, tuple):
            return packed[1].data.to(self.device)
        return packed

    def saving(self) -> contextlib.AbstractContextManager[None]:
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)


class BareSide(Side):
    """diffusers + lycoris by hand: no raytuner code in the model or the step."""

    name = "bare"

    def __init__(self, bench: Bench, cell: Cell, settings: Settings) -> None:
        from lycoris import LycorisNetwork, create_lycoris

        from raytuner.adapters import preserved_lycoris_class_state

        self.bench = bench
        self.family = cell.family
        self.settings = settings
        device = bench.device
        offload = cell.strategy == "group_offload"
        self.transformer = build_transformer(
            bench, cell.family, on=torch.device("cpu") if offload else device, seed=bench.args.seed
        )
        if cell.checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.transformer.train()
        options = dict(settings.lycoris)
        preset = options.pop("apply_preset", None)
        algo_options = {
            k: v for k, v in options.items() if k not in ("multiplier", "linear_dim", "linear_alpha")
        }
        # Only so the two sides in one process do not see each other's LyCORIS preset: apply_preset
        # writes class-level state.
        with preserved_lycoris_class_state():
            if preset:
                LycorisNetwork.apply_preset(
                    {
                        "target_module": [
                            BARE_PRESET_CLASSES.get(n, n) for n in preset.get("target_module", [])
                        ],
                        "module_algo_map": {
                            BARE_PRESET_CLASSES.get(n, n): v
                            for n, v in preset.get("module_algo_map", {}).items()
                        },
                    }
                )
            torch.manual_seed(bench.args.seed)
            self.network = create_lycoris(
                self.transformer,
                float(options.get("multiplier", 1.0)),
                int(options.get("linear_dim", 4)),
                float(options.get("linear_alpha", 1.0)),
                **algo_options,
            )
            self.network.apply_to()
        self.network.to(device=device, dtype=torch.float32).requires_grad_(True)
        self.notes = [f"lycoris: {len(self.network.loras)} modules"]
        self.keep: FrozenWeightsForBackward | None = None
        self.use_stream: bool | None = None
        if offload:
            # CUDA streams prefetch the next group; diffusers' hooks do not support them under
            # gradient checkpointing, whose recomputation runs groups out of order.
            self.use_stream = device.type == "cuda" and not cell.checkpointing
            self.transformer.enable_group_offload(
                onload_device=device,
                offload_device=torch.device("cpu"),
                offload_type="block_level",
                num_blocks_per_group=1,
                use_stream=self.use_stream,
                non_blocking=self.use_stream,
            )
            self.keep = FrozenWeightsForBackward(self.transformer, device)
        self.parameters = [p for p in self.network.parameters() if p.requires_grad]
        # adamw_bf16's settings in SimpleTuner, on float32 LoKr weights.
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=settings.learning_rate, betas=(0.9, 0.999), eps=1e-6, weight_decay=1e-2
        )

    def prepare(self, batch: Batch) -> dict[str, Any]:
        """The conditioning in the form the transformer takes, on the device, built once."""
        device = self.bench.device
        if self.family == "cosmos2image":
            embeds = torch.zeros(batch.size, 512, batch.prompts[0]["prompt_embeds"].shape[-1])
            for row, prompt in enumerate(batch.prompts):
                embeds[row, : prompt["prompt_embeds"].shape[0]] = prompt["prompt_embeds"]
            edge = batch.latents.shape[-1] * PIXELS_PER_LATENT
            return {
                "latents": batch.latents,
                "encoder_hidden_states": embeds.to(device, DTYPE),
                "padding_mask": torch.zeros(1, 1, edge, edge, device=device, dtype=DTYPE),
            }
        from diffusers.pipelines.omnigen.processor_omnigen import OmniGenCollator

        edge = batch.latents.shape[-1] * PIXELS_PER_LATENT
        ids, positions, mask, _, _, sizes = OmniGenCollator().process_mllm_input(
            [
                {"input_ids": p["input_ids"].tolist(), "pixel_values": None, "image_sizes": None}
                for p in batch.prompts
            ],
            [[edge, edge]] * batch.size,
        )
        return {
            "latents": batch.latents,
            "input_ids": ids.to(device),
            "position_ids": positions.to(device),
            "attention_mask": mask.to(device),
            "input_image_sizes": sizes,
        }

    def step(self, prepared: dict[str, Any], index: int) -> float:
        x0 = prepared["latents"]
        noise = torch.randn_like(x0)
        sigma = torch.sigmoid(torch.randn(x0.shape[0], device=x0.device))  # logit-normal noise level
        shape = (-1,) + (1,) * (x0.dim() - 1)
        noisy = (1 - sigma.view(shape)) * x0 + sigma.view(shape) * noise
        saving = self.keep.saving() if self.keep is not None else contextlib.nullcontext()
        with saving, torch.autocast(device_type=x0.device.type, dtype=DTYPE):
            if self.family == "cosmos2image":
                prediction = self.transformer(
                    hidden_states=noisy.to(DTYPE),
                    timestep=sigma.to(DTYPE),
                    encoder_hidden_states=prepared["encoder_hidden_states"],
                    padding_mask=prepared["padding_mask"],
                    return_dict=False,
                )[0]
                target = noise - x0
            else:
                prediction = self.transformer(
                    hidden_states=noisy.to(DTYPE),
                    timestep=(1 - sigma).to(DTYPE),  # OmniGen runs from noise (0) to data (1)
                    input_ids=prepared["input_ids"],
                    input_img_latents=[],
                    input_image_sizes=prepared["input_image_sizes"],
                    attention_mask=prepared["attention_mask"],
                    position_ids=prepared["position_ids"],
                    return_dict=False,
                )[0]
                target = x0 - noise
            loss = F.mse_loss(prediction.float(), target)
            loss.backward()
        torch.nn.utils.clip_grad_value_(self.parameters, self.settings.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    @contextlib.contextmanager
    def checkpointing_off(self) -> Iterator[None]:
        yield  # FLOPs are counted on the raytuner side only


# ---- measuring -------------------------------------------------------------------------------------


def _free_memory(bench: Bench) -> None:
    gc.collect()
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()


def _peak_bytes(bench: Bench) -> int | None:
    return torch.cuda.max_memory_allocated(bench.device) if bench.device.type == "cuda" else None


def _reset_peak(bench: Bench) -> None:
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(bench.device)


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def timed_steps(
    bench: Bench, side: Side, batch: Batch, *, warmup: int, steps: int, first_index: int = 0
) -> dict:
    """Warm-up, then ``steps`` timed optimiser steps; median step time and peak memory of the timed ones."""
    prepared = side.prepare(batch)
    index = first_index
    for _ in range(warmup):
        side.step(prepared, index)
        index += 1
    bench.synchronize()
    _reset_peak(bench)
    times, losses = [], []
    for _ in range(steps):
        bench.synchronize()
        start = time.perf_counter()
        losses.append(side.step(prepared, index))
        bench.synchronize()
        times.append(time.perf_counter() - start)
        index += 1
    median = statistics.median(times)
    peak = _peak_bytes(bench)
    return {
        "batch": batch.size,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "step_s": median,
        "step_s_all": times,
        "samples_per_s": batch.size / median,
        "peak_memory_gib": peak / GIB if peak is not None else None,
        "losses": losses,
        "losses_finite": all(math.isfinite(value) for value in losses),
    }


def one_step_peak(bench: Bench, side: Side, batch: Batch, index: int) -> tuple[bool, int | None, float, str]:
    """One optimiser step at ``batch``: (it fitted, its peak memory, seconds, the error if any)."""
    _free_memory(bench)
    _reset_peak(bench)
    start = time.perf_counter()
    error = ""
    try:
        side.step(side.prepare(batch), index)
        bench.synchronize()
    except Exception as caught:  # an out-of-memory error is expected here; anything else is raised
        if not _is_oom(caught):
            raise
        error = _describe(caught)
    seconds = time.perf_counter() - start
    if error:
        side.optimizer.zero_grad(set_to_none=True)
        _free_memory(bench)
        return False, None, seconds, error
    return True, _peak_bytes(bench), seconds, ""


def largest_batch(bench: Bench, side: Side, family: str, peak_at_1: int) -> dict[str, Any]:
    """The largest batch that fits, capped at --max-batch (see the module docstring)."""
    cap = bench.args.max_batch
    start = time.perf_counter()
    record: dict[str, Any] = {"cap": cap, "tried": []}
    if bench.device.type != "cuda" or cap < 2:
        record.update(batch=max(1, min(cap, 2)), note="no search: CPU (no memory limit to find) or cap < 2")
        return record
    fitted, peak_at_2, seconds, error = one_step_peak(
        bench, side, make_batch(bench, family, 2, seed=2), 10_000
    )
    record["tried"].append({"batch": 2, "fitted": fitted, "seconds": seconds, "error": error})
    if not fitted or peak_at_2 is None:
        record.update(batch=1, seconds=time.perf_counter() - start, note="batch 2 does not fit")
        return record
    per_sample = max(peak_at_2 - peak_at_1, 1)
    fixed = peak_at_1 - per_sample
    capacity = torch.cuda.get_device_properties(bench.device).total_memory * (1 - MEMORY_HEADROOM)
    estimate = int((capacity - fixed) // per_sample)
    record.update(
        per_sample_gib=per_sample / GIB,
        fixed_gib=fixed / GIB,
        memory_estimate=estimate,
        capped=estimate > cap,
    )
    candidate, chosen = min(estimate, cap), 2
    while candidate > 2:
        fitted, _, seconds, error = one_step_peak(
            bench, side, make_batch(bench, family, candidate, seed=candidate), 20_000
        )
        record["tried"].append({"batch": candidate, "fitted": fitted, "seconds": seconds, "error": error})
        if fitted:
            chosen = candidate
            break
        candidate = candidate * 3 // 4
    record.update(batch=chosen, seconds=time.perf_counter() - start)
    return record


def count_flops(bench: Bench, side: Side, family: str) -> float:
    """FLOPs per sample of one optimiser step at batch 1, without gradient checkpointing."""
    from torch.utils.flop_counter import FlopCounterMode

    prepared = side.prepare(make_batch(bench, family, 1, seed=1))
    with side.checkpointing_off(), FlopCounterMode(display=False) as counter:
        side.step(prepared, 30_000)
    return float(counter.get_total_flops())


def _entry(cell: Cell, side: str, label: str) -> dict[str, Any]:
    return {
        "family": cell.family,
        "strategy": cell.strategy,
        "gradient_checkpointing": cell.checkpointing,
        "batch_kind": label,
        "side": side,
    }


def measure(bench: Bench, entry: dict[str, Any], side: Side | None, run: Callable[[], dict]) -> dict:
    """One cell for one side: its figures, or why there are none. Never raises: the matrix goes on."""
    if side is None:
        if "error" not in entry:
            entry["skipped"] = f"the time budget of {bench.args.budget_s:.0f} s was spent"
    elif bench.over_budget():
        entry["skipped"] = f"the time budget of {bench.args.budget_s:.0f} s was spent"
    else:
        try:
            entry.update(run())
        except Exception as error:
            entry["error"] = _describe(error)
            with contextlib.suppress(Exception):
                side.optimizer.zero_grad(set_to_none=True)
            _free_memory(bench)
    bench.results["cells"].append(entry)
    write_results(bench)
    print(_progress(entry), flush=True)
    return entry


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _progress(entry: dict) -> str:
    where = (
        f"{entry['family']:<13} {entry['strategy']:<13} ckpt {'on ' if entry['gradient_checkpointing'] else 'off'} "
        f"{entry['batch_kind']:<8} {entry['side']:<9}"
    )
    if "step_s" not in entry:
        return f"{where} {entry.get('error') or entry.get('skipped')}"
    memory = f"{entry['peak_memory_gib']:.1f} GiB" if entry.get("peak_memory_gib") is not None else "-"
    return (
        f"{where} batch {entry['batch']:>3}  {entry['step_s']:.3f} s/step  "
        f"{entry['samples_per_s']:.2f} samples/s  peak {memory}"
    )


def build_side(
    bench: Bench, side_class: type[Side], cell: Cell, settings: Settings
) -> tuple[Side | None, dict]:
    """The side's model, adapter and optimizer, and what building them took (or why it failed)."""
    _free_memory(bench)
    start = time.perf_counter()
    try:
        side = side_class(bench, cell, settings)
    except Exception as error:
        _free_memory(bench)
        return None, {"error": f"building the model: {_describe(error)}"}
    bench.synchronize()
    facts: dict[str, Any] = {
        "build_s": time.perf_counter() - start,
        "use_stream": side.use_stream,
        "trainable_parameters": sum(p.numel() for p in side.parameters),
        "notes": side.notes,
    }
    if bench.device.type == "cuda":
        facts["model_memory_gib"] = torch.cuda.memory_allocated(bench.device) / GIB
    return side, facts


def _steps(
    bench: Bench, side: Side | None, cell: Cell, size: int | None, warmup: int, steps: int
) -> Callable[[], dict]:
    """The timed steps of one measurement, run by :func:`measure` only when there is a side and a size."""

    def run() -> dict:
        assert side is not None and size
        batch = make_batch(bench, cell.family, size, seed=size)
        return timed_steps(bench, side, batch, warmup=warmup, steps=steps)

    return run


def run_cell(bench: Bench, cell: Cell, settings: Settings) -> None:
    """Both sides of one (family, strategy, checkpointing), one after the other, each on its own
    freshly built model: batch 1, then the largest batch (searched by whichever side gets there first)."""
    args = bench.args
    search: dict[str, Any] | None = None
    for side_class in (RaytunerSide, BareSide):
        side, facts = (None, {}) if bench.over_budget() else build_side(bench, side_class, cell, settings)
        if (
            side is not None
            and side.name == "raytuner"
            and cell.family not in bench.results["flops_per_sample"]
        ):
            try:
                bench.results["flops_per_sample"][cell.family] = count_flops(bench, side, cell.family)
            except Exception as error:
                facts["flops_error"] = _describe(error)
        peak_at_1: int | None = None
        for label in args.batches:
            entry = {**_entry(cell, side_class.name, label), **facts}
            if label == "1":
                entry = measure(bench, entry, side, _steps(bench, side, cell, 1, args.warmup, args.steps))
                if entry.get("peak_memory_gib") is not None:
                    peak_at_1 = round(entry["peak_memory_gib"] * GIB)
                continue
            searched_here = False
            if search is None and side is not None and not bench.over_budget():
                search = run_search(bench, side, cell, peak_at_1)
                searched_here = True
            size = (search or {}).get("batch")
            if side is not None and not size:
                reason = (search or {}).get("error", "the search did not run")
                entry["error"] = f"no batch size: {reason}"
            # The search's last step warmed this side up at the chosen size already.
            warm = 0 if searched_here and bench.device.type == "cuda" else 1
            measure(
                bench, entry, side if size else None, _steps(bench, side, cell, size, warm, args.large_steps)
            )
        if side is not None:
            side.close()
        del side
        _free_memory(bench)


def run_search(bench: Bench, side: Side, cell: Cell, peak_at_1: int | None) -> dict[str, Any]:
    try:
        if peak_at_1 is None and bench.device.type == "cuda":
            peak_at_1 = one_step_peak(bench, side, make_batch(bench, cell.family, 1, seed=1), 40_000)[1]
        search = largest_batch(bench, side, cell.family, peak_at_1 or 0)
    except Exception as error:
        search = {"batch": None, "error": _describe(error)}
    search.update(
        family=cell.family, strategy=cell.strategy, gradient_checkpointing=cell.checkpointing, side=side.name
    )
    bench.results["batch_search"].append(search)
    return search


# ---- the machine and its ceilings ------------------------------------------------------------------


def machine(bench: Bench) -> dict[str, Any]:
    versions = {}
    for package in ("torch", "diffusers", "transformers", "lycoris-lora", "accelerate", "raytuner"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "versions": versions,
        "cuda": torch.version.cuda,
        "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "device": str(bench.device),
    }
    if bench.device.type == "cuda":
        properties = torch.cuda.get_device_properties(bench.device)
        info.update(
            gpu=properties.name,
            capability=f"{properties.major}.{properties.minor}",
            multiprocessors=properties.multi_processor_count,
            gpu_memory_gib=properties.total_memory / GIB,
        )
    return info


def datasheet_peak(bench: Bench) -> float | None:
    """The GPU's dense bf16 peak in FLOP/s: --peak-tflops, else the datasheet figure by name."""
    if bench.args.peak_tflops:
        return bench.args.peak_tflops * 1e12
    if bench.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(bench.device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def matmul_rate(bench: Bench) -> float | None:
    """bf16 FLOP/s of an 8192^3 matrix product on random data (median of 10 after 3 warm-ups)."""
    if bench.device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=bench.device, dtype=DTYPE)
    b = torch.randn(n, n, device=bench.device, dtype=DTYPE)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del a, b
    _free_memory(bench)
    return 2 * n**3 / statistics.median(times)


# ---- results ---------------------------------------------------------------------------------------


def with_mfu(bench: Bench) -> list[dict]:
    peak = bench.results["peak_bf16_flops"]["datasheet"]
    cells = []
    for cell in bench.results["cells"]:
        cell = dict(cell)
        flops = bench.results["flops_per_sample"].get(cell["family"])
        if flops and peak and "samples_per_s" in cell:
            cell["model_tflops_per_s"] = flops * cell["samples_per_s"] / 1e12
            cell["mfu"] = flops * cell["samples_per_s"] / peak
        cells.append(cell)
    return cells


def write_results(bench: Bench) -> None:
    out = Path(bench.args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {key: value for key, value in bench.results.items() if not key.startswith("_")}
    results["cells"] = with_mfu(bench)
    results["elapsed_s"] = time.monotonic() - bench.started
    (out / "gpu_train.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "gpu_train.md").write_text(markdown(results))


def _number(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _tera(flops: float | None) -> str:
    return _number(flops / 1e12 if flops else None, 1)


def markdown(results: dict[str, Any]) -> str:
    info = results["machine"]
    peak = results["peak_bf16_flops"]
    lines = [
        f"# gpu_train: {info.get('gpu', info['device'])}",
        "",
        f"torch {info['versions'].get('torch')}, CUDA {info['cuda']}, diffusers {info['versions'].get('diffusers')}, "
        f"lycoris-lora {info['versions'].get('lycoris-lora')}; {results['pixels']} px images; bf16; "
        f"elapsed {results['elapsed_s']:.0f} s.",
        f"bf16 peak: datasheet {_tera(peak['datasheet'])} TFLOP/s, "
        f"8192^3 matmul measured {_tera(peak['measured_matmul'])} TFLOP/s.",
        "Model TFLOP per sample (FlopCounterMode, one raytuner step at batch 1, no checkpointing): "
        + ", ".join(f"{name} {value / 1e12:.3g}" for name, value in results["flops_per_sample"].items()),
        "",
        "| family | strategy | checkpointing | batch | raytuner s/step | bare s/step | raytuner / bare "
        "| raytuner samples/s | bare samples/s | raytuner peak GiB | bare peak GiB | raytuner MFU | bare MFU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    grouped: dict[tuple, dict[str, dict]] = {}
    for cell in results["cells"]:
        key = (cell["family"], cell["strategy"], cell["gradient_checkpointing"], cell["batch_kind"])
        grouped.setdefault(key, {})[cell["side"]] = cell
    for (family, strategy, checkpointing, _), sides in grouped.items():
        ours, bare = sides.get("raytuner", {}), sides.get("bare", {})
        batch = ours.get("batch") or bare.get("batch")
        ratio = ours["step_s"] / bare["step_s"] if "step_s" in ours and "step_s" in bare else None
        stream = " (streams)" if ours.get("use_stream") else ""
        row = [
            family,
            strategy + stream,
            "on" if checkpointing else "off",
            str(batch) if batch else ("error" if "error" in ours or "error" in bare else "skipped"),
            _number(ours.get("step_s")),
            _number(bare.get("step_s")),
            _number(ratio),
            _number(ours.get("samples_per_s"), 2),
            _number(bare.get("samples_per_s"), 2),
            _number(ours.get("peak_memory_gib"), 1),
            _number(bare.get("peak_memory_gib"), 1),
            _number(ours.get("mfu")),
            _number(bare.get("mfu")),
        ]
        lines.append("| " + " | ".join(row) + " |")
    problems = [c for c in results["cells"] if "error" in c or "skipped" in c]
    if problems:
        lines += ["", "Not measured:", ""]
        lines += [
            f"- {c['family']} {c['strategy']} ckpt {'on' if c['gradient_checkpointing'] else 'off'} "
            f"batch {c['batch_kind']} {c['side']}: {c.get('error') or c.get('skipped')}"
            for c in problems
        ]
    if results["batch_search"]:
        lines += [
            "",
            "| family | strategy | checkpointing | chosen batch | memory estimate | capped at | tried | search s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for search in results["batch_search"]:
            tried = ", ".join(
                f"{t['batch']}{'' if t['fitted'] else ' (OOM)'}" for t in search.get("tried", [])
            )
            lines.append(
                f"| {search['family']} | {search['strategy']} | {'on' if search['gradient_checkpointing'] else 'off'} "
                f"| {search.get('batch')} | {search.get('memory_estimate', '-')} | {search.get('cap', '-')} "
                f"| {tried or '-'} | {_number(search.get('seconds'), 1)} |"
            )
    return "\n".join(lines) + "\n"


# ---- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tiny", action="store_true", help="tiny random configs, 64 px, few steps (CPU tests)"
    )
    parser.add_argument("--device", default=None, help="cuda (default where present) or cpu")
    parser.add_argument(
        "--out", default=None, help="results folder (default: $OUT, else bench/results/gpu_train)"
    )
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--checkpointing", nargs="+", choices=("off", "on"), default=["off", "on"])
    parser.add_argument("--batches", nargs="+", choices=("1", "largest"), default=["1", "largest"])
    parser.add_argument(
        "--pixels", type=int, default=None, help="image edge in pixels (default 1024; --tiny 64)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="warm-up steps at batch 1 (default 2; --tiny 1)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps at batch 1 (default 5; --tiny 2)"
    )
    parser.add_argument(
        "--large-steps", type=int, default=None, help="timed steps at the largest batch (default 3)"
    )
    parser.add_argument("--max-batch", type=int, default=8, help="cap of the largest-batch search")
    parser.add_argument("--budget-s", type=float, default=240.0, help="cells starting later are skipped")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, TFLOP/s")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.pixels = args.pixels or (64 if args.tiny else 1024)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    args.steps = args.steps or (2 if args.tiny else 5)
    args.large_steps = args.large_steps or (2 if args.tiny else 3)
    args.out = args.out or os.environ.get("OUT") or str(ROOT / "bench" / "results" / "gpu_train")
    if args.pixels % 16:
        parser.error("--pixels must be a multiple of 16 (8 pixels per latent, 2 latents per token)")
    return args


def bench_device(name: str | None) -> torch.device:
    """``--device`` (default: CUDA when present), made current when it is a GPU."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        # An explicit index: torch.cuda.set_device refuses a bare "cuda".
        device = torch.device(
            "cuda", device.index if device.index is not None else torch.cuda.current_device()
        )
        torch.cuda.set_device(device)
    return device


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = bench_device(args.device)
    bench = Bench(
        args=args,
        device=device,
        configs=TINY_CONFIGS if args.tiny else {"cosmos2image": COSMOS2_2B, "omnigen": OMNIGEN_V1},
    )
    bench.results = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "tiny": args.tiny,
        "pixels": args.pixels,
        "machine": machine(bench),
        "peak_bf16_flops": {"datasheet": datasheet_peak(bench), "measured_matmul": matmul_rate(bench)},
        "flops_per_sample": {},
        "flops_method": "FlopCounterMode over one raytuner optimizer step at batch 1, gradient checkpointing off",
        "batch_search": [],
        "cells": [],
    }
    print(json.dumps(bench.results["machine"]), flush=True)
    settings = {family: quickstart_settings(family) for family in args.families}
    # Cheapest first, the families side by side: a run cut short by --budget-s loses the costliest
    # cells (group offload, then with gradient checkpointing) of both families, not one family.
    for strategy in args.strategies:
        for checkpointing in args.checkpointing:
            for family in args.families:
                run_cell(bench, Cell(family, strategy, checkpointing == "on"), settings[family])
    write_results(bench)
    print((Path(args.out) / "gpu_train.md").read_text(), flush=True)
    return json.loads((Path(args.out) / "gpu_train.json").read_text())


if __name__ == "__main__":
    main()
