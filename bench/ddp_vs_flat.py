"""Data-parallel gradient averaging on 2 gloo workers (CPU): torch's DistributedDataParallel over
the adapter, as the data-parallel strategy runs it, against the hand-written reduce it replaced
(every gradient and the step's loss figures flattened into one tensor, one all-reduce after the
last accumulation micro-step).

    .venv/bin/python bench/ddp_vs_flat.py [--steps 20] [--repeats 3]

Both run the same training step on the tiny Cosmos2 checkpoint with its quickstart
``lycoris_config.json`` (batch 2 per worker, 2 accumulation micro-steps, 64 x 64); the table gives
the median milliseconds per step over ``--repeats`` alternating runs. No Ray: two processes.
Never run by the test suite; the numbers are written up in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing

from raytuner import flow
from raytuner.adapters import build_adapter
from raytuner.config import load_config
from raytuner.data.synthetic import synthetic_images, to_pixels
from raytuner.models.registry import get_family
from raytuner.models.tiny import build_tiny_checkpoint
from raytuner.ray_runtime import free_port
from raytuner.train.model import AdaptedModel
from raytuner.train.step import MicroBatch, accumulate, clip_and_step, micro_batch_loss
from raytuner.train.strategy import DataParallel, StepSettings

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
WORKERS = 2
ACCUMULATION = 2
BATCH = 2
SCHEDULE = flow.FlowSchedule(shift=3.0)
VARIANTS = ("ddp", "hand-written")


def flat_step(model: AdaptedModel, optimizer: torch.optim.Optimizer, micro: list[MicroBatch]) -> float:
    """The replaced data-parallel step: local accumulation, then one flat all-reduce of everything."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    optimizer.zero_grad(set_to_none=True)

    def loss_of(batch: MicroBatch) -> torch.Tensor:
        return micro_batch_loss(model.family, model.transformer, model.network, batch, SCHEDULE)

    tally = accumulate(loss_of, micro, lambda loss: (loss / len(micro)).backward())
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters]
    flat = _flatten_dense_tensors([g.float() for g in grads])
    totals = torch.cat([tally.losses, tally.counts]).to(flat.dtype)
    reduced = torch.cat([flat, totals])
    dist.all_reduce(reduced)
    reduced /= WORKERS
    flat = reduced[: flat.numel()]
    for parameter, gradient in zip(model.parameters, _unflatten_dense_tensors(flat, grads), strict=True):
        parameter.grad = gradient
    return clip_and_step(model.parameters, optimizer, max_grad_norm=None, grad_clip_method="value")


def worker(rank: int, variant: str, checkpoint: Path, steps: int, port: int, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORKERS)
    try:
        family = get_family("cosmos2image")(checkpoint)
        items = synthetic_images(BATCH * ACCUMULATION, width=64, height=64, seed=rank)
        latents = family.encode_images(to_pixels([item.image for item in items]))
        conditioning = family.encode_prompts([item.caption for item in items])
        transformer = family.load_transformer().requires_grad_(False)
        spec = load_config(CONFIGS / "cosmos2image" / "config.json").lycoris
        assert spec is not None
        network, report = build_adapter(transformer, spec, module_aliases=family.module_aliases, seed=0)
        parameters = [p for p in network.parameters() if p.requires_grad]
        model = AdaptedModel(
            family=family, transformer=transformer, network=network, parameters=parameters, report=report
        )
        optimizer = torch.optim.AdamW(parameters, lr=1e-3)
        micro = [
            MicroBatch(
                latents=latents[i * BATCH : (i + 1) * BATCH],
                conditioning=family.collate_conditioning(conditioning[i * BATCH : (i + 1) * BATCH]),
                generators=torch.Generator().manual_seed(i),
            )
            for i in range(ACCUMULATION)
        ]
        strategy = DataParallel(rank=rank, world_size=WORKERS, device=torch.device("cpu"))
        settings = StepSettings(
            schedule=SCHEDULE, mixed_precision="no", max_grad_norm=None, grad_clip_method="value"
        )
        strategy.prepare(model, optimizer, settings)

        def step() -> None:
            if variant == "ddp":
                strategy.step(micro)
            else:
                flat_step(model, optimizer, micro)

        for _ in range(3):  # warm-up
            step()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        dist.barrier()
        if rank == 0:
            (out / f"{variant}.txt").write_text(f"{(time.perf_counter() - start) / steps * 1000}\n")
            (out / "adapter.txt").write_text(f"{sum(p.numel() for p in parameters)}\n")
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    timings: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        checkpoint = build_tiny_checkpoint("cosmos2image", root / "cosmos2image")
        for _ in range(args.repeats):
            for variant in VARIANTS:
                torch.multiprocessing.spawn(
                    worker,
                    args=(variant, checkpoint, args.steps, free_port(), root),
                    nprocs=WORKERS,
                    join=True,
                )
                timings[variant].append(float((root / f"{variant}.txt").read_text()))
        adapter = int((root / "adapter.txt").read_text())
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, adapter {adapter} parameters"
    )
    print("| gradient averaging | ms / step (median) | runs |")
    print("| --- | --- | --- |")
    for variant, values in timings.items():
        runs = ", ".join(f"{value:.1f}" for value in values)
        print(f"| {variant} | {statistics.median(values):.1f} | {runs} |")


if __name__ == "__main__":
    main()
