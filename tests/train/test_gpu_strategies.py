"""The memory strategies on a CUDA GPU, in one process without Ray (run on the lent accelerator).

The CPU tests show that group offload and DeepSpeed ZeRO train the adapter plain training does
(tests/train/test_offload.py, and inside Ray Train tests/train/test_strategies_ray.py). What only a
GPU shows: group offload with CUDA streams, the base's weights waiting in CPU memory while the
steps run on the GPU, and ZeRO-2 and ZeRO-3 on NCCL with DeepSpeed's CUDA accelerator. Each test
trains the tiny Cosmos2 checkpoint for a few steps both ways from the same adapter, on the same
samples with the same per-sample noise, and compares the losses and the adapter. Nothing clips
(DeepSpeed clips by global norm, raytuner's plain step by value by default).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from raytuner.adapters import build_adapter
from raytuner.data.synthetic import synthetic_images, to_pixels
from raytuner.models.registry import get_family
from raytuner.ray_runtime import free_port
from raytuner.train.offload import (
    OFFLOAD_DEVICE,
    OffloadedWeights,
    apply_group_offload,
    has_group_offload_hooks,
    plan_group_offload,
)
from raytuner.train.strategy import StepSettings
from tests.train.helpers import LOKR, SCHEDULE, Setup, micro, perturb, train_steps, training

pytestmark = pytest.mark.gpu  # tests/conftest.py skips these where CUDA is absent

STEPS = 3
LEARNING_RATE = 3e-2
Data = tuple[torch.Tensor, list]


def cuda() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def encode(model: Path, device: torch.device) -> Data:
    """Latents and prompt conditioning of four synthetic images, encoded once on ``device``."""
    family = get_family("cosmos2image")(model, device=device)
    items = synthetic_images(4, width=64, height=64, seed=1)
    latents = family.encode_images(to_pixels([item.image for item in items]))
    return latents, family.encode_prompts([item.caption for item in items])


def adapted(model: Path, data: Data, device: torch.device, *, base_on: torch.device, seed: int = 3) -> Setup:
    """The tiny Cosmos2 transformer (float32) with its LoKr on ``device``; the base on ``base_on``."""
    family = get_family("cosmos2image")(model, device=device)
    transformer = family.load_transformer(device=base_on).requires_grad_(False)
    assert LOKR is not None
    network, report = build_adapter(transformer, LOKR, module_aliases=family.module_aliases, seed=seed)
    network.to(device=device, dtype=torch.float32)
    parameters = [p for p in network.parameters() if p.requires_grad]
    latents, conditioning = data
    return Setup(family, transformer, network, parameters, latents, conditioning, report)


def plain_steps(setup: Setup, steps: int = STEPS) -> list[float]:
    return train_steps(setup, steps, lr=LEARNING_RATE)


def assert_same_adapter(a: Setup, b: Setup) -> None:
    for first, second in zip(a.parameters, b.parameters, strict=True):
        torch.testing.assert_close(first, second, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def data(tiny_cosmos_dir: Path) -> Data:
    return encode(tiny_cosmos_dir, cuda())


# ---- group offload -----------------------------------------------------------------------------------


def offload_matches_resident(
    model: Path, data: Data, device: torch.device, *, offload_type: str, use_stream: bool, checkpointing: bool
) -> None:
    """Train the base resident on ``device`` and group-offloaded to the CPU: the same steps."""
    setups = []
    for base_on in (device, OFFLOAD_DEVICE):
        setup = adapted(model, data, device, base_on=base_on)
        perturb(setup)
        if checkpointing:
            setup.transformer.enable_gradient_checkpointing()
        setup.transformer.train()
        setups.append(setup)
    resident, offloaded = setups
    keys = {
        "group_offload_type": offload_type,
        "group_offload_use_stream": use_stream,
        "gradient_checkpointing": checkpointing,
    }
    plan = plan_group_offload(training(**keys).memory, device=device, run_name="gpu", rank=0)
    assert plan is not None
    # Streams need CUDA, and diffusers' hooks do not support them under gradient checkpointing.
    assert plan.use_stream == (use_stream and device.type == "cuda" and not checkpointing)
    apply_group_offload(offloaded.transformer, plan, onload_device=device)
    assert has_group_offload_hooks(offloaded.transformer)
    # The frozen base waits in CPU memory; only the running group is on the GPU.
    assert {p.device.type for p in offloaded.transformer.parameters()} == {OFFLOAD_DEVICE.type}

    expected = plain_steps(resident)
    with OffloadedWeights(offloaded.transformer, onload_device=device).saving():
        got = plain_steps(offloaded)
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert all(p.device == device for p in offloaded.parameters)
    assert_same_adapter(resident, offloaded)


@pytest.mark.parametrize(
    ("offload_type", "use_stream", "checkpointing"),
    [
        ("block_level", True, False),
        ("leaf_level", True, False),
        ("block_level", False, False),
        ("leaf_level", False, False),
        ("block_level", True, True),  # streams fall back off under gradient checkpointing
    ],
)
def test_group_offload_on_cuda_trains_exactly_like_the_resident_base(
    tiny_cosmos_dir: Path, data: Data, offload_type: str, use_stream: bool, checkpointing: bool
) -> None:
    offload_matches_resident(
        tiny_cosmos_dir,
        data,
        cuda(),
        offload_type=offload_type,
        use_stream=use_stream,
        checkpointing=checkpointing,
    )


# ---- DeepSpeed ZeRO --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def process_group() -> Iterator[str]:
    """A one-process NCCL group on loopback, with the variables a launcher (Ray Train) would set."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield dist.get_backend()
        return
    port = free_port()
    variables = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in variables.items():
            patch.setenv(name, value)
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        try:
            yield "nccl"
        finally:
            dist.destroy_process_group()


def zero_matches_plain(model: Path, data: Data, device: torch.device, folder: Path, *, stage: int) -> None:
    """ZeRO ``stage`` through raytuner's engine against raytuner's plain step, then save and load."""
    from raytuner.config.deepspeed import check_deepspeed, generated_config
    from raytuner.train.deepspeed_plan import plan_deepspeed
    from raytuner.train.zero import DeepSpeedZero

    settings = training(
        enable_group_offload=False, max_grad_norm=0.0, train_batch_size=4, mixed_precision="no"
    )
    checked = check_deepspeed(generated_config(stage), mixed_precision="no", where="test")
    plan = plan_deepspeed(checked, settings.optimization, world_size=1, where="test")
    assert plan.stage == stage and plan.config["gradient_clipping"] == 0.0

    def engine_for(setup: Setup) -> DeepSpeedZero:
        optimizer = torch.optim.AdamW(setup.parameters, lr=LEARNING_RATE)
        strategy = DeepSpeedZero(plan, rank=0, world_size=1, device=device)
        step = StepSettings(
            schedule=SCHEDULE, mixed_precision="no", max_grad_norm=None, grad_clip_method="norm"
        )
        strategy.prepare(setup.model(), optimizer, step)
        return strategy

    def engine_steps(engine: DeepSpeedZero, setup: Setup, steps: int = STEPS) -> list[float]:
        return [engine.step([micro(setup, 0, 4)]).loss for _ in range(steps)]

    plain = adapted(model, data, device, base_on=device)
    zero = adapted(model, data, device, base_on=device)
    for setup in (plain, zero):
        perturb(setup)
    engine = engine_for(zero)
    assert engine.engine.device.type == device.type
    expected = plain_steps(plain)
    got = engine_steps(engine, zero)
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert_same_adapter(plain, zero)

    # A fresh engine (another initial adapter) loads what this one saved and takes the same next step.
    engine.save(folder)
    fresh = adapted(model, data, device, base_on=device, seed=11)
    restored = engine_for(fresh)
    restored.load_engine(folder)
    assert_same_adapter(zero, fresh)
    assert engine_steps(restored, fresh, 1) == pytest.approx(
        engine_steps(engine, zero, 1), rel=1e-5, abs=1e-7
    )
    assert_same_adapter(zero, fresh)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_on_cuda_trains_the_plain_steps_adapter_and_round_trips_its_state(
    tiny_cosmos_dir: Path, data: Data, process_group: str, tmp_path: Path, stage: int
) -> None:
    deepspeed = pytest.importorskip("deepspeed")
    # Imported with CUDA present, DeepSpeed picks its CUDA accelerator (raytuner sets DS_ACCELERATOR
    # only for CPU workers).
    assert deepspeed.get_accelerator().device_name() == "cuda"
    assert process_group == "nccl"
    zero_matches_plain(tiny_cosmos_dir, data, cuda(), tmp_path / "checkpoint", stage=stage)
