"""Time LoKr flow-matching training steps on the tiny checkpoints (CPU), per family and image size.

    .venv/bin/python bench/train_step.py [--steps 20] [--sizes 64 128]

Prints a table of milliseconds per step; the numbers are written up in bench/RESULTS.md with the
machine they were taken on. Never run by the test suite.
"""

from __future__ import annotations

import argparse
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

from raytuner import flow
from raytuner.adapters import build_adapter
from raytuner.config import load_config
from raytuner.data.synthetic import synthetic_images, to_pixels
from raytuner.models.registry import get_family
from raytuner.models.tiny import build_tiny_checkpoint
from raytuner.train.step import train_step

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def time_family(name: str, folder: Path, size: int, steps: int, batch: int) -> float:
    family = get_family(name)(folder)
    items = synthetic_images(batch, width=size, height=size)
    latents = family.encode_images(to_pixels([item.image for item in items]))
    conditioning = family.collate_conditioning(family.encode_prompts([item.caption for item in items]))
    transformer = family.load_transformer()
    spec = load_config(CONFIGS / name / "config.json").lycoris
    assert spec is not None
    network, _ = build_adapter(transformer, spec, module_aliases=family.module_aliases)
    parameters = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3)
    schedule = flow.FlowSchedule(auto_shift=True)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):  # warm-up
        train_step(
            family, transformer, parameters, optimizer, latents, conditioning, schedule, generator=generator
        )
    start = time.perf_counter()
    for _ in range(steps):
        train_step(
            family, transformer, parameters, optimizer, latents, conditioning, schedule, generator=generator
        )
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    print(f"{'family':<14}{'size':>6}{'batch':>7}{'ms/step':>10}")
    with tempfile.TemporaryDirectory() as root:
        for name in ("cosmos2image", "omnigen"):
            folder = build_tiny_checkpoint(name, Path(root) / name)
            for size in args.sizes:
                milliseconds = time_family(name, folder, size, args.steps, args.batch)
                print(f"{name:<14}{size:>6}{args.batch:>7}{milliseconds:>10.1f}")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
