"""The data-parallel strategy is torch's DistributedDataParallel over the adapter alone, and two
gloo workers train exactly what one worker trains on their combined batch. No Ray: two processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing
from torch.nn.parallel import DistributedDataParallel

from raytuner.ray_runtime import free_port
from raytuner.train.step import MicroBatch
from raytuner.train.strategy import AdapterModule, DataParallel, StepSettings
from tests.train.helpers import SCHEDULE, Setup, make_setup, micro, perturb

STEPS = 3
WORKERS = 2
# Plain steps, no clipping: what DDP changes is only the order of the gradients' summation.
SETTINGS = StepSettings(schedule=SCHEDULE, mixed_precision="no", max_grad_norm=None, grad_clip_method="value")


def train(strategy: DataParallel, setup: Setup, micro_batches: list[MicroBatch]) -> dict[str, object]:
    strategy.prepare(setup.model(), torch.optim.AdamW(setup.parameters, lr=3e-2), SETTINGS)
    results = [strategy.step(micro_batches) for _ in range(STEPS)]
    return {
        "losses": [r.loss for r in results],
        "grad_norms": [r.grad_norm for r in results],
        "adapter": [p.detach().clone() for p in setup.parameters],
    }


def worker(rank: int, model: Path, folder: Path, port: int) -> None:
    """Rank ``rank`` of two: samples 2r and 2r+1 of the four, one per accumulation micro-step."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORKERS)
    try:
        setup = make_setup(model)
        perturb(setup)
        strategy = DataParallel(rank=rank, world_size=WORKERS, device=torch.device("cpu"))
        result = train(
            strategy, setup, [micro(setup, 2 * rank, 2 * rank + 1), micro(setup, 2 * rank + 1, 2 * rank + 2)]
        )
        module = strategy.module
        assert isinstance(module, DistributedDataParallel)
        # DDP holds and reduces the adapter's tensors and nothing of the frozen base.
        result["ddp_parameters"] = {id(p) for p in module.parameters()} == {id(p) for p in setup.parameters}
        result["base_parameters"] = sum(p.numel() for p in setup.transformer.parameters())
        torch.save(result, folder / f"rank-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ddp_workers_train_what_one_worker_trains_on_their_combined_batch(
    tiny_cosmos_dir: Path, tmp_path: Path
) -> None:
    torch.multiprocessing.spawn(
        worker, args=(tiny_cosmos_dir, tmp_path, free_port()), nprocs=WORKERS, join=True
    )
    ranks = [torch.load(tmp_path / f"rank-{rank}.pt", weights_only=False) for rank in range(WORKERS)]
    assert all(rank["ddp_parameters"] for rank in ranks) and ranks[0]["base_parameters"] > 0

    setup = make_setup(tiny_cosmos_dir)
    perturb(setup)
    one = DataParallel(rank=0, world_size=1, device=torch.device("cpu"))
    expected = train(one, setup, [micro(setup, 0, 4)])
    assert isinstance(one.module, AdapterModule)  # one process: nothing to average, no wrapper

    for rank in ranks:
        # Every worker reports the step's figures over all workers' samples.
        assert rank["losses"] == pytest.approx(expected["losses"], rel=1e-5)
        assert rank["grad_norms"] == pytest.approx(expected["grad_norms"], rel=1e-4)
        for got, want in zip(rank["adapter"], expected["adapter"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
