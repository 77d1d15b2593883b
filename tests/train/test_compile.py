"""dynamo_backend: the worker's transformer compiled in place (raytuner/train/compile.py), checked
on the tiny Cosmos2 checkpoint without Ray, with torch's CPU backends (eager, aot_eager)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from raytuner import flow
from raytuner.config import load_config
from raytuner.config.training import MemorySection
from raytuner.train.compile import CompileError, compile_options, compile_problem, compile_transformer
from raytuner.train.model import AdaptedModel, build_model
from tests.cache.helpers import draw_images, image_dataset, text_dataset, write_run_files
from tests.config.helpers import make_write_run

CPU = torch.device("cpu")


def test_the_dynamo_keys_become_torch_compile_options() -> None:
    memory = MemorySection()
    assert compile_options(memory) is None
    assert compile_options(dataclasses.replace(memory, dynamo_backend="no", dynamo_fullgraph=True)) is None
    on = dataclasses.replace(memory, dynamo_backend="inductor", dynamo_mode="auto")
    assert compile_options(on) == {"backend": "inductor"}
    every = dataclasses.replace(on, dynamo_mode="max-autotune", dynamo_fullgraph=True, dynamo_dynamic=True)
    assert compile_options(every) == {
        "backend": "inductor",
        "mode": "max-autotune",
        "fullgraph": True,
        "dynamic": True,
    }
    assert compile_problem(on) is None


def test_what_cannot_be_compiled_is_refused_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_run = make_write_run(tmp_path, monkeypatch)
    run = load_config(write_run(config_updates={"dynamo_backend": "inductor", "dynamo_mode": "auto"}))
    assert run.training.memory.dynamo_backend == "inductor"
    assert not [w for w in run.warnings if "dynamo" in w]
    for written, read in (("AOT_EAGER", "aot_eager"), ("aot-eager", "aot_eager"), ("none", "no")):
        spelled = load_config(write_run(config_updates={"dynamo_backend": written}))
        assert spelled.training.memory.dynamo_backend == read, written
    offloaded = dataclasses.replace(run.training.memory, enable_group_offload=True)
    assert "not with enable_group_offload" in str(compile_problem(offloaded))
    zero = load_config(write_run(config_updates={"dynamo_backend": "eager", "deepspeed_config": "zero2"}))
    assert "not with deepspeed_config" in str(compile_problem(zero.training.memory))
    # One of Accelerate's names that torch no longer ships: refused by torch's own list.
    gone = dataclasses.replace(run.training.memory, dynamo_backend="nvprims_nvfuser")
    assert "this torch has no such compiler backend; expected one of: eager, aot_eager" in str(
        compile_problem(gone)
    )
    with pytest.raises(CompileError, match="not with enable_group_offload"):
        compile_transformer(torch.nn.Linear(2, 2), offloaded)


def _model(root: Path, tiny_cosmos_dir: Path, **config: Any) -> AdaptedModel:
    draw_images(root / "images", [(64, 64)])
    datasets = [image_dataset(root / "images", root / "vae"), text_dataset(root / "text")]
    run = write_run_files(root, tiny_cosmos_dir, datasets, gradient_checkpointing=False, **config).load()
    model = build_model(run, device=CPU, base_device=CPU)
    # The seeded adapter starts as a no-op (one LoKr factor is zero): move it off so it matters.
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters:
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.mark.slow  # compiles the tiny transformer (seconds)
def test_a_compiled_transformer_trains_the_adapter_as_the_eager_one(
    tmp_path: Path, tiny_cosmos_dir: Path
) -> None:
    eager = _model(tmp_path / "eager", tiny_cosmos_dir)
    compiled = _model(
        tmp_path / "compiled",
        tiny_cosmos_dir,
        dynamo_backend="aot_eager",
        dynamo_use_regional_compilation=True,
    )
    # Regional: each transformer block compiled in place, the transformer itself left eager.
    blocks = list(compiled.transformer.transformer_blocks)
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert compiled.transformer._compiled_call_impl is None
    assert eager.transformer.transformer_blocks[0]._compiled_call_impl is None

    latents = torch.randn((2, 16, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    family = eager.family
    conditioning = family.collate_conditioning(family.encode_prompts(["a red circle", "a blue square"]))
    losses = []
    for model in (eager, compiled):
        loss = family.training_loss(
            model.transformer,
            latents,
            conditioning,
            flow.FlowSchedule(),
            generator=torch.Generator().manual_seed(5),
        ).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0])
    # The LoKr gradients flow through the compiled blocks, the same as through the eager ones.
    for ours, theirs in zip(compiled.parameters, eager.parameters, strict=True):
        assert ours.grad is not None and theirs.grad is not None
        # aot_eager traces the backward into its own graph (other kernels, e.g. attention's, and
        # another float32 summation order): the same gradient within a few parts in a thousand.
        assert theirs.grad.norm() > 0
        assert (ours.grad - theirs.grad).norm() <= 1e-2 * theirs.grad.norm()
