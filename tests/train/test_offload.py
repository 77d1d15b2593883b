"""Group offload of the frozen base without Ray: hooks, files on disk, the same training, fallbacks."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from raytuner.train.offload import (
    OFFLOAD_DEVICE,
    GroupOffloadPlan,
    OffloadedWeights,
    apply_group_offload,
    group_offload_hooks,
    has_group_offload_hooks,
    plan_group_offload,
    remove_disk_copy,
)
from tests.train.helpers import Setup, make_setup, perturb, train_steps, training

CPU = torch.device("cpu")


def offloaded_setup(
    model: Path, plan_keys: dict[str, object], *, checkpointing: bool = False
) -> tuple[Setup, GroupOffloadPlan, OffloadedWeights]:
    setup = make_setup(model)
    perturb(setup)
    if checkpointing:
        setup.transformer.enable_gradient_checkpointing()
        setup.transformer.train()
    plan = plan_group_offload(training(**plan_keys).memory, device=CPU, run_name="run", rank=0)
    assert plan is not None
    apply_group_offload(setup.transformer, plan, onload_device=CPU)
    return setup, plan, OffloadedWeights(setup.transformer, onload_device=CPU)


@pytest.mark.parametrize(
    ("offload_type", "to_disk", "checkpointing"),
    [
        ("block_level", True, False),
        ("block_level", True, True),
        ("block_level", False, False),
        ("leaf_level", False, False),
        ("leaf_level", False, True),
    ],
)
def test_offloaded_base_trains_exactly_like_the_resident_one(
    tiny_cosmos_dir: Path, tmp_path: Path, offload_type: str, to_disk: bool, checkpointing: bool
) -> None:
    resident = make_setup(tiny_cosmos_dir)
    perturb(resident)
    if checkpointing:
        resident.transformer.enable_gradient_checkpointing()
        resident.transformer.train()
    keys: dict[str, object] = {"group_offload_type": offload_type, "gradient_checkpointing": checkpointing}
    if to_disk:
        keys["group_offload_to_disk_path"] = tmp_path / "offload"
    offloaded, plan, weights = offloaded_setup(tiny_cosmos_dir, keys, checkpointing=checkpointing)
    assert has_group_offload_hooks(offloaded.transformer)
    assert not has_group_offload_hooks(resident.transformer)

    expected = train_steps(resident, 3)
    with weights.saving():
        got = train_steps(offloaded, 3)
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)
    for a, b in zip(resident.parameters, offloaded.parameters, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if to_disk:
        # The base's weights were written to this run's and rank's own folder, then removed.
        assert plan.disk_path is not None and plan.disk_path.parent == tmp_path / "offload"
        assert plan.disk_path.name.startswith("run-rank0-")
        written = [p for p in plan.disk_path.rglob("*.safetensors")]
        assert written and all(p.stat().st_size > 0 for p in written)
        remove_disk_copy(plan)
        assert not plan.disk_path.exists()


def test_without_backward_safe_weights_disk_offload_corrupts_training(
    tiny_cosmos_dir: Path, tmp_path: Path
) -> None:
    """Why OffloadedWeights exists: autograd's saved weights are swapped out under it."""
    resident = make_setup(tiny_cosmos_dir)
    perturb(resident)
    offloaded, _, _ = offloaded_setup(tiny_cosmos_dir, {"group_offload_to_disk_path": tmp_path})
    expected, got = train_steps(resident, 2), train_steps(offloaded, 2)
    assert got[0] == pytest.approx(expected[0], rel=1e-6)
    # The first backward ran on whatever the swapped-out weights' memory held by then, so how far
    # the second loss strays varies from run to run (from 0.1% to a few percent, or NaN): far past
    # the float noise that the backward-safe weights stay within (rel 1e-6, above).
    assert got[1] != pytest.approx(expected[1], rel=1e-5)


def test_each_run_and_rank_gets_a_fresh_disk_folder(tmp_path: Path) -> None:
    config = training(group_offload_to_disk_path=tmp_path)
    first = plan_group_offload(config.memory, device=CPU, run_name="run", rank=0)
    again = plan_group_offload(config.memory, device=CPU, run_name="run", rank=0)
    other = plan_group_offload(config.memory, device=CPU, run_name="run", rank=1)
    assert first and again and other
    folders = {first.disk_path, again.disk_path, other.disk_path}
    assert len(folders) == 3 and all(folder and folder.is_dir() for folder in folders)


def test_streams_fall_back_off_cuda_and_under_gradient_checkpointing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cpu_plan = plan_group_offload(
        training(group_offload_use_stream=True, gradient_checkpointing=False).memory,
        device=CPU,
        run_name="r",
        rank=0,
    )
    assert cpu_plan is not None and not cpu_plan.use_stream
    assert any("streams need a CUDA device" in note for note in cpu_plan.notes)
    cuda_plan = plan_group_offload(
        training(group_offload_use_stream=True, gradient_checkpointing=True).memory,
        device=torch.device("cuda"),
        run_name="r",
        rank=0,
    )
    assert cuda_plan is not None and not cuda_plan.use_stream
    assert any("gradient_checkpointing" in note for note in cuda_plan.notes)
    kept = plan_group_offload(
        training(group_offload_use_stream=True, gradient_checkpointing=False).memory,
        device=torch.device("cuda"),
        run_name="r",
        rank=0,
    )
    assert kept is not None and kept.use_stream and not kept.notes
    leaf = plan_group_offload(
        training(group_offload_type="leaf_level").memory, device=CPU, run_name="r", rank=0
    )
    assert leaf is not None and leaf.blocks_per_group is None
    assert (
        plan_group_offload(training(enable_group_offload=False).memory, device=CPU, run_name="r", rank=0)
        is None
    )


def test_the_fallback_is_said_in_the_log(tiny_cosmos_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    setup = make_setup(tiny_cosmos_dir)
    plan = plan_group_offload(
        training(group_offload_use_stream=True).memory, device=CPU, run_name="r", rank=0
    )
    assert plan is not None
    with caplog.at_level(logging.INFO, logger="raytuner.train.offload"):
        apply_group_offload(setup.transformer, plan, onload_device=CPU)
    assert "streams need a CUDA device" in caplog.text
    assert "without streams" in caplog.text
    assert OFFLOAD_DEVICE == CPU


def _groups(transformer: torch.nn.Module) -> int:
    return len({id(hook.group) for hook in group_offload_hooks(transformer)})


def test_blocks_per_group_sets_how_many_blocks_move_together(tiny_cosmos_dir: Path, tmp_path: Path) -> None:
    one, _, _ = offloaded_setup(tiny_cosmos_dir, {"group_offload_blocks_per_group": 1})
    two, plan, _ = offloaded_setup(tiny_cosmos_dir, {"group_offload_blocks_per_group": 2})
    assert plan.blocks_per_group == 2
    # The tiny transformer has 2 blocks: one group each, or both in one (plus the layers outside them).
    assert _groups(one.transformer) == _groups(two.transformer) + 1
