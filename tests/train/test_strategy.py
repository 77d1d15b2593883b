"""The strategy factory: one strategy per run, chosen from the job, with no side effects."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from raytuner.config.deepspeed import check_deepspeed, generated_config
from raytuner.train.deepspeed_plan import plan_deepspeed
from raytuner.train.job import TrainJob
from raytuner.train.layout import SharedRootMarker
from raytuner.train.strategy import (
    DEEPSPEED_ACCELERATOR_ENV,
    DataParallel,
    GroupOffload,
    build_strategy,
    worker_environment,
)
from raytuner.train.zero import DeepSpeedZero
from tests.cache.helpers import image_dataset, text_dataset, write_run_files

CPU = torch.device("cpu")


def job(tmp_path: Path, model: Path, *, deepspeed: bool = False, **config: object) -> TrainJob:
    (tmp_path / "images").mkdir(parents=True, exist_ok=True)
    datasets = [image_dataset(tmp_path / "images", "cache/vae"), text_dataset("cache/text")]
    run = write_run_files(tmp_path, model, datasets, **config).load()
    checked = check_deepspeed(
        generated_config(2), mixed_precision=run.training.model.mixed_precision, where="t"
    )
    plan = plan_deepspeed(checked, run.training.optimization, world_size=2, where="t") if deepspeed else None
    return TrainJob(
        run=run,
        run_name="run",
        total_steps=4,
        steps_per_epoch=2,
        marker=SharedRootMarker(locations=(), token="t"),
        deepspeed=plan,
    )


def test_the_job_chooses_the_strategy(tmp_path: Path, tiny_cosmos_dir: Path) -> None:
    plain = build_strategy(job(tmp_path / "a", tiny_cosmos_dir), rank=0, world_size=2, device=CPU)
    assert type(plain) is DataParallel and plain.base_device == CPU and not plain.collective
    offload = job(tmp_path / "b", tiny_cosmos_dir, enable_group_offload=True)
    offloaded = build_strategy(offload, rank=1, world_size=2, device=CPU)
    assert isinstance(offloaded, GroupOffload) and offloaded.plan.offload_type == "block_level"
    zero = build_strategy(
        job(tmp_path / "c", tiny_cosmos_dir, deepspeed=True), rank=0, world_size=2, device=CPU
    )
    assert isinstance(zero, DeepSpeedZero) and zero.describe() == "DeepSpeed ZeRO stage 2"
    # Without a process group (here) a worker has no peers to reduce with or wait for.
    assert not zero.collective and zero.eval_reduce is None


def test_deepspeeds_cpu_accelerator_is_returned_for_the_worker_to_set_not_set_here(
    tmp_path: Path, tiny_cosmos_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(DEEPSPEED_ACCELERATOR_ENV, raising=False)
    zero = job(tmp_path / "a", tiny_cosmos_dir, deepspeed=True)
    assert worker_environment(zero, CPU)[DEEPSPEED_ACCELERATOR_ENV][0] == "cpu"
    assert DEEPSPEED_ACCELERATOR_ENV not in os.environ
    assert worker_environment(zero, torch.device("cuda", 0)) == {}
    assert worker_environment(job(tmp_path / "b", tiny_cosmos_dir), CPU) == {}
    monkeypatch.setenv(DEEPSPEED_ACCELERATOR_ENV, "cuda")  # a value set by the user wins
    assert worker_environment(zero, CPU) == {}
