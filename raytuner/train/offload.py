"""Group offload of the frozen base transformer (SimpleTuner's ``enable_group_offload``).

diffusers' group offloading keeps the base model's weights on the CPU (or on disk) and moves one
group of blocks (``block_level``) or one leaf layer (``leaf_level``) onto the GPU just before it
runs. The LoKr weights live in the LyCORIS network, not in the transformer, so they stay on the
device and train as usual; only the frozen base moves.

Two orderings matter:

- Offload is applied *after* LyCORIS. LyCORIS replaces each adapted layer's ``forward`` with its
  own, which reads the layer's weight directly; diffusers' leaf-level hook must wrap that forward
  so the weight is on the device when it is read.
- CUDA streams prefetch the next group while the current one computes. diffusers' offload hooks
  do not support streams under gradient checkpointing (the recomputation in backward runs the
  groups out of order), so that combination trains without streams, as SimpleTuner does, and says
  so once.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.models.modeling_utils import ModelMixin

from raytuner.config.training import MemorySection
from raytuner.upstream import group_offload_hooks, group_offload_weight_sources

logger = logging.getLogger(__name__)

OFFLOAD_DEVICE = torch.device("cpu")


@dataclass(frozen=True, kw_only=True)
class GroupOffloadPlan:
    """What :func:`apply_group_offload` does on one worker, after the fallbacks are decided."""

    offload_type: str  # block_level | leaf_level
    blocks_per_group: int | None  # block_level only
    use_stream: bool
    disk_path: Path | None  # this run's and rank's own folder, or None for CPU memory
    notes: tuple[str, ...] = ()  # the fallbacks taken, each said once in the log


def plan_group_offload(
    memory: MemorySection, *, device: torch.device, run_name: str, rank: int
) -> GroupOffloadPlan | None:
    """The group offload this worker applies, or None when ``enable_group_offload`` is off.

    A disk offload path gets a fresh subfolder per run and rank: diffusers reuses any file it
    finds there under a module's name, so a folder shared between runs (or between workers on one
    node) would feed one model another's weights.
    """
    if not memory.enable_group_offload:
        return None
    notes: list[str] = []
    use_stream = memory.group_offload_use_stream
    if use_stream and device.type != "cuda":
        notes.append(
            f"group_offload_use_stream: streams need a CUDA device, this worker runs on {device.type}; offloading without streams"
        )
        use_stream = False
    if use_stream and memory.gradient_checkpointing:
        notes.append(
            "group_offload_use_stream with gradient_checkpointing: diffusers' offload hooks do not support "
            "streams under gradient checkpointing; offloading without streams (set gradient_checkpointing "
            "false to keep them)"
        )
        use_stream = False
    disk_path = None
    if memory.group_offload_to_disk_path is not None:
        root = Path(memory.group_offload_to_disk_path)
        root.mkdir(parents=True, exist_ok=True)
        disk_path = Path(tempfile.mkdtemp(prefix=f"{run_name}-rank{rank}-", dir=root))
    block_level = memory.group_offload_type == "block_level"
    return GroupOffloadPlan(
        offload_type=memory.group_offload_type,
        blocks_per_group=memory.group_offload_blocks_per_group if block_level else None,
        use_stream=use_stream,
        disk_path=disk_path,
        notes=tuple(notes),
    )


def apply_group_offload(
    transformer: ModelMixin, plan: GroupOffloadPlan, *, onload_device: torch.device
) -> None:
    """Install diffusers' group offload hooks on ``transformer`` (already adapted by LyCORIS).

    ``transformer`` must be on the CPU: its weights stay there (or go to ``plan.disk_path``) and
    only the running group is copied to ``onload_device``.
    """
    for note in plan.notes:
        logger.warning(note)
    transformer.enable_group_offload(
        onload_device=onload_device,
        offload_device=OFFLOAD_DEVICE,
        offload_type=plan.offload_type,
        num_blocks_per_group=plan.blocks_per_group,
        use_stream=plan.use_stream,
        # With streams the weights are pinned once up front (diffusers' default), which is what
        # lets each copy overlap with the previous group's compute.
        non_blocking=plan.use_stream,
        offload_to_disk_path=str(plan.disk_path) if plan.disk_path is not None else None,
    )
    where = f"disk ({plan.disk_path})" if plan.disk_path is not None else "CPU memory"
    grouping = (
        f"{plan.blocks_per_group} block(s) per group"
        if plan.offload_type == "block_level"
        else "one layer per group"
    )
    logger.info(
        "group offload: frozen base weights in %s, %s onto %s, %s",
        where,
        grouping,
        onload_device,
        "with CUDA streams" if plan.use_stream else "without streams",
    )


class OffloadedWeights:
    """Backward-safe saved tensors for a group-offloaded frozen base.

    diffusers' hooks swap a layer's weights out (``param.data = …``) as soon as its group has run,
    which is right for inference. In training, autograd keeps a reference to the weights it needs
    for the backward pass (a norm's scale, a layer the adapter does not touch, anything between the
    loss and an adapted layer), and after the swap that reference reads the offloaded copy: CPU
    memory on a GPU worker, or freed placeholders when the group went to disk. Inside
    :meth:`saving`, autograd saves such a weight by name and reads it back when the backward pass
    needs it: from the parameter onto the compute device, or from the group's file on disk. Only
    the one weight is brought back, for the one operation that needs it.
    """

    def __init__(self, transformer: torch.nn.Module, *, onload_device: torch.device) -> None:
        self.onload_device = onload_device
        # id(parameter) -> (parameter, file of its group on disk or None, its key in that file)
        self.sources: dict[int, tuple[torch.nn.Parameter, Path | None, str | None]] = {}
        for parameter, path, key in group_offload_weight_sources(transformer):
            self.sources[id(parameter)] = (parameter, path, key)

    def _pack(self, tensor: torch.Tensor) -> Any:
        if isinstance(tensor, torch.nn.Parameter) and not tensor.requires_grad and id(tensor) in self.sources:
            return ("offloaded", id(tensor))
        return tensor

    def _unpack(self, packed: Any) -> torch.Tensor:
        if not (isinstance(packed, tuple) and packed and packed[0] == "offloaded"):
            return packed
        parameter, path, key = self.sources[packed[1]]
        if path is not None and path.is_file():
            # The group was written to disk when it was first offloaded: the file holds the frozen
            # weight, whether the parameter is onloaded right now or a placeholder.
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as weights:
                return weights.get_tensor(key).to(self.onload_device)
        return parameter.data.to(self.onload_device)

    def saving(self) -> contextlib.AbstractContextManager[None]:
        """The training forward runs inside this block."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)


def has_group_offload_hooks(module: torch.nn.Module) -> bool:
    """Whether diffusers' group offload hooks are installed anywhere in ``module``."""
    return next(group_offload_hooks(module), None) is not None


def remove_disk_copy(plan: GroupOffloadPlan | None) -> None:
    """Delete this run's offload folder at the end: it only held copies of the base weights."""
    if plan is not None and plan.disk_path is not None:
        shutil.rmtree(plan.disk_path, ignore_errors=True)
