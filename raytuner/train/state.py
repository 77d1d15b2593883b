"""What a training checkpoint holds, written whole before it is reported and checked before it is read.

One checkpoint folder::

    pytorch_lora_weights.safetensors   the adapter at this step (loads with the seeds' recipe)
    ema/pytorch_lora_weights.safetensors   its EMA twin, with use_ema
    training_state.pt                  adapter, EMA, optimizer and scheduler state, the step, eval loss
    rng/rank-<r>.pt                    each worker's Python, NumPy and torch RNG states
    raytuner_checkpoint.json           written last: step, world size, every file's size

Rank 0 writes everything but the RNG files, which each worker writes for itself; Ray Train merges
the workers' folders into one. The data position is the step itself: the epoch plans are a pure
function of the step they start at (raytuner/batches/steps.py), so step ``s`` resumes at the batch
the interrupted run would have trained next.
A folder without its ``raytuner_checkpoint.json``, or with a file of the wrong size, is refused.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raytuner.errors import RaytunerError

MANIFEST_NAME = "raytuner_checkpoint.json"
STATE_NAME = "training_state.pt"
FORMAT_VERSION = 1


class CheckpointError(RaytunerError, ValueError):
    """A checkpoint that cannot be resumed from; the message names it and why."""


@dataclass(frozen=True, kw_only=True)
class CheckpointInfo:
    step: int
    world_size: int
    steps_per_epoch: int
    files: dict[str, int]


def rng_file(rank: int) -> str:
    return f"rng/rank-{rank}.pt"


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_rng(folder: Path, rank: int) -> None:
    path = folder / rng_file(rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(capture_rng(), path)


def write_state(folder: Path, state: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / STATE_NAME)


def write_manifest(folder: Path, *, step: int, world_size: int, steps_per_epoch: int) -> None:
    """The commit point, written after every other file of rank 0's part of the checkpoint."""
    files = {
        str(path.relative_to(folder)): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }
    manifest = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "world_size": world_size,
        "steps_per_epoch": steps_per_epoch,
        "files": files,
    }
    partial = folder / f".{MANIFEST_NAME}.partial"
    partial.write_text(json.dumps(manifest, indent=2) + "\n")
    partial.replace(folder / MANIFEST_NAME)


def read_manifest(folder: Path) -> CheckpointInfo:
    """The checkpoint's manifest, after checking every file it lists is there and whole."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{folder}: not a complete raytuner checkpoint (no {MANIFEST_NAME}: it was never finished "
            "writing, or is not a raytuner checkpoint); pick another checkpoint folder"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable ({error}); pick another checkpoint folder") from None
    for name, size in manifest["files"].items():
        file = folder / name
        if not file.is_file() or file.stat().st_size != size:
            raise CheckpointError(
                f"{folder}: {name} is missing or truncated (expected {size} bytes); the checkpoint is "
                "incomplete: pick another checkpoint folder"
            )
    return CheckpointInfo(
        step=int(manifest["step"]),
        world_size=int(manifest["world_size"]),
        steps_per_epoch=int(manifest["steps_per_epoch"]),
        files=dict(manifest["files"]),
    )


def read_state(folder: Path) -> dict[str, Any]:
    return torch.load(folder / STATE_NAME, map_location="cpu", weights_only=False)


def read_rng(folder: Path, rank: int) -> dict[str, Any] | None:
    path = folder / rng_file(rank)
    return torch.load(path, weights_only=False) if path.is_file() else None
