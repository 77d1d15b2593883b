"""The memory strategies inside real Ray Train runs on CPU: DeepSpeed ZeRO-2 and ZeRO-3 with two
gloo workers, and diffusers' group offload to disk, each against plain data parallelism.

The plan, each sample's noise and sigma depend only on (seed, sample, step), and no run clips, so
every strategy must train the same adapter: ZeRO only moves where gradients and optimizer state
live, group offload only where the frozen base's weights wait between layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from raytuner.adapters import load_adapter
from raytuner.filenames import ADAPTER_FILENAME
from raytuner.models.registry import get_family
from raytuner.train.launcher import TrainOutcome
from raytuner.train.zero import ENGINE_FOLDER, ENGINE_TAG
from tests.training_data import (
    Data,
    assert_same_adapter,
    checkpoints,
    train,
    train_lines,
)

pytestmark = pytest.mark.slow

STEPS = 4
# Same plan as the data-parallel module, shorter, without clipping (DeepSpeed clips by norm only).
RUN: dict[str, Any] = {
    "max_train_steps": STEPS,
    "max_grad_norm": 0.0,
    "checkpoint_step_interval": 2,
    "validation_step_interval": 2,
    "eval_steps_interval": 2,
}


@pytest.fixture(scope="module")
def data_parallel(ray_cluster, cosmos_data: Data, tmp_path_factory) -> TrainOutcome:
    return train(tmp_path_factory.mktemp("ddp"), cosmos_data, workers=2, **RUN)


@pytest.fixture(scope="module")
def zero2(ray_cluster, cosmos_data: Data, tmp_path_factory) -> TrainOutcome:
    """ZeRO-2 on two workers with the optimizer state offloaded to the CPU, each worker taking two
    accumulation micro-steps through the engine: the data-parallel run's global batch of 4."""
    return train(
        tmp_path_factory.mktemp("zero2"),
        cosmos_data,
        workers=2,
        deepspeed_config="zero2-offload",
        **{**RUN, "train_batch_size": 1, "gradient_accumulation_steps": 2},
    )


def engine_files(outcome: TrainOutcome, step: int) -> list[str]:
    folder = outcome.output_dir / "ray"
    (checkpoint,) = folder.glob(f"*/checkpoint-{step:07d}")
    return sorted(p.name for p in (checkpoint / ENGINE_FOLDER / ENGINE_TAG).iterdir())


def test_zero2_with_offloaded_optimizer_and_accumulation_trains_the_data_parallel_adapter_through_the_engine(
    data_parallel: TrainOutcome,
    zero2: TrainOutcome,
    cosmos_data: Data,
) -> None:
    assert_same_adapter(data_parallel.adapter, zero2.adapter)
    assert_same_adapter(
        data_parallel.output_dir / "ema" / ADAPTER_FILENAME, zero2.output_dir / "ema" / ADAPTER_FILENAME
    )
    lines = train_lines(zero2.output_dir)
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    assert [line["loss"] for line in lines] == pytest.approx(
        [line["loss"] for line in train_lines(data_parallel.output_dir)], rel=1e-4
    )
    # Each worker's optimizer partition is in the Ray Train checkpoint, beside rank 0's model state.
    files = engine_files(zero2, STEPS)
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in files
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in files
    assert checkpoints(zero2.output_dir) == ["checkpoint-0000002", "checkpoint-0000004"]
    assert sorted(p.name for p in (zero2.output_dir / "validation" / "step_4").glob("*.png"))
    # The export is the same file format as with data parallelism: the seeds' recipe loads it.
    transformer = get_family("cosmos2image").transformer_class.from_pretrained(
        cosmos_data.model, subfolder="transformer"
    )
    assert load_adapter(zero2.adapter, transformer, merge=True).loras


def test_zero3_resumes_through_the_engine_and_trains_the_same_adapter(
    ray_cluster,
    cosmos_data: Data,
    data_parallel: TrainOutcome,
    tmp_path: Path,
) -> None:
    options: dict[str, Any] = {**RUN, "workers": 2, "deepspeed_config": "zero3"}
    first = train(tmp_path, cosmos_data, **{**options, "max_train_steps": 2})
    assert [line["step"] for line in train_lines(first.output_dir)] == [1, 2]
    resumed = train(tmp_path, cosmos_data, **options)
    lines = train_lines(resumed.output_dir)
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    assert resumed.steps == STEPS
    # ZeRO-3 writes one model-state and one optimizer partition per worker.
    files = engine_files(resumed, STEPS)
    for rank in (0, 1):
        assert f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" in files
        assert f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in files
    # Validation ran in lockstep on both workers; rank 0 kept the images, EMA included.
    names = sorted(p.name for p in (resumed.output_dir / "validation" / "step_4").glob("*.png"))
    assert "validation-32x32-ema.png" in names and "validation-32x32.png" in names
    # Restored optimizer partitions and EMA: the same adapters as an uninterrupted data-parallel run.
    assert_same_adapter(data_parallel.adapter, resumed.adapter)
    assert_same_adapter(
        data_parallel.output_dir / "ema" / ADAPTER_FILENAME, resumed.output_dir / "ema" / ADAPTER_FILENAME
    )


def test_group_offload_to_disk_trains_the_same_adapter_and_cleans_up(
    ray_cluster,
    cosmos_data: Data,
    data_parallel: TrainOutcome,
    tmp_path: Path,
) -> None:
    offload = tmp_path / "offload"
    outcome = train(
        tmp_path,
        cosmos_data,
        workers=1,
        gradient_accumulation_steps=2,  # one worker, the same global batch of 4
        enable_group_offload=True,
        group_offload_type="block_level",
        group_offload_blocks_per_group=1,
        group_offload_use_stream=True,  # no CUDA here: the logged fallback
        group_offload_to_disk_path=str(offload),
        **RUN,
    )
    assert_same_adapter(data_parallel.adapter, outcome.adapter)
    # The run's own subfolder held the offloaded weights and was removed at the end.
    assert offload.is_dir() and not list(offload.iterdir())
    lines = train_lines(outcome.output_dir)
    assert all(torch.isfinite(torch.tensor(line["loss"])) for line in lines)
