"""How the workers hold the model and train it: one interface, chosen once per run.

Every strategy answers the loop the same questions, so the loop never asks which one it has:

- where the frozen base model's weights are loaded (``base_device``);
- :meth:`~TrainingStrategy.prepare` the adapted model and its optimizer;
- :meth:`~TrainingStrategy.step`: forward, backward and the optimiser step over one step's
  micro-batches, returning the step's numbers (:class:`~raytuner.train.step.StepResult`);
- what a checkpoint holds of it (:meth:`~TrainingStrategy.save`,
  :meth:`~TrainingStrategy.optimizer_state`, :meth:`~TrainingStrategy.load`);
- whether evaluation and validation run on every worker in lockstep (``collective``);
- :meth:`~TrainingStrategy.close`.

The implementations: :class:`DataParallel` (torch's ``DistributedDataParallel`` over a module
that holds only the LyCORIS network), :class:`GroupOffload` (data parallel with the frozen base's
weights offloaded by diffusers' group offload) and ``DeepSpeedZero`` (``raytuner/train/zero.py``).
A quantised base (``base_model_precision``) is a transform of the base model before the adapter
is built (``raytuner/train/model.py``), not a strategy: it composes with each of them.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.parallel import DistributedDataParallel

from raytuner import flow
from raytuner.config.training import UNCLIPPED_OPTIMIZERS, TrainingConfig
from raytuner.train.offload import (
    OFFLOAD_DEVICE,
    GroupOffloadPlan,
    OffloadedWeights,
    apply_group_offload,
    plan_group_offload,
    remove_disk_copy,
)
from raytuner.train.schedule import flow_schedule_from_config
from raytuner.train.state import CheckpointInfo
from raytuner.train.step import (
    MicroBatch,
    ReduceSum,
    StepResult,
    micro_batch_loss,
    optimizer_step,
)

if TYPE_CHECKING:
    from raytuner.train.job import TrainJob
    from raytuner.train.model import AdaptedModel

logger = logging.getLogger(__name__)

# DeepSpeed picks its accelerator when it is imported; a CPU worker must name the CPU one first.
DEEPSPEED_ACCELERATOR_ENV = "DS_ACCELERATOR"


@dataclass(frozen=True, kw_only=True)
class StepSettings:
    """What every strategy's step reads of the config."""

    schedule: flow.FlowSchedule
    mixed_precision: str
    max_grad_norm: float | None  # None: never clip (the optimisers that bound their own updates)
    grad_clip_method: str

    @classmethod
    def from_training(cls, training: TrainingConfig) -> StepSettings:
        return cls(
            schedule=flow_schedule_from_config(training.flow),
            mixed_precision=training.model.mixed_precision,
            max_grad_norm=None
            if training.optimization.optimizer in UNCLIPPED_OPTIMIZERS
            else training.optimization.max_grad_norm,
            grad_clip_method=training.optimization.grad_clip_method,
        )


def distributed(world_size: int) -> bool:
    """Whether this worker has peers in an initialised process group."""
    return world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    torch.distributed.all_reduce(tensor)
    return tensor


class TrainingStrategy(ABC):
    """One worker's way of holding and training the adapted model (see the module docstring)."""

    def __init__(self, *, rank: int, world_size: int, device: torch.device) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.distributed = distributed(world_size)

    @property
    def base_device(self) -> torch.device:
        """Where the frozen base model's weights are loaded."""
        return self.device

    @property
    def collective(self) -> bool:
        """Whether every forward of the base needs every worker, so evaluation and validation run
        in lockstep on all of them instead of on each worker's share (ZeRO-3)."""
        return False

    @property
    def eval_reduce(self) -> ReduceSum | None:
        """How the evaluation loss is summed over the workers that each evaluated their share."""
        return reduce_sum if self.distributed and not self.collective else None

    @abstractmethod
    def describe(self) -> str:
        """A few words for the log."""

    @abstractmethod
    def prepare(self, model: AdaptedModel, optimizer: torch.optim.Optimizer, settings: StepSettings) -> None:
        """Wrap the adapted model and its optimizer for training."""

    @abstractmethod
    def step(self, micro_batches: list[MicroBatch]) -> StepResult:
        """Forward, backward and one optimiser step over this worker's micro-batches of one step."""

    def save(self, folder: Path) -> None:
        """Write this worker's own part of a checkpoint into ``folder`` (every worker calls it)."""
        return  # the data-parallel strategies' whole state is rank 0's

    @abstractmethod
    def optimizer_state(self) -> dict[str, Any] | None:
        """The optimizer state rank 0 keeps in the checkpoint's training state, or None."""

    @abstractmethod
    def load(self, folder: Path, saved: Mapping[str, Any], info: CheckpointInfo, *, source: str) -> None:
        """Restore the adapter and optimizer state of a checkpoint written by any strategy and
        worker count; optimizer state that cannot fit this run starts fresh, with a warning."""

    def close(self) -> None:
        """Release what the strategy holds outside the process (files, engines)."""
        return

    def warn_fresh_optimizer(self, source: str, reason: str) -> None:
        if self.rank == 0:
            logger.warning("%s %s: the adapter is restored, the optimizer state starts fresh", source, reason)


class AdapterModule(torch.nn.Module):
    """What ``DistributedDataParallel`` wraps: the LyCORIS network as its only submodule.

    The LoKr parameters live in the network, outside the transformer: wrapping the transformer
    would leave DDP nothing to reduce and broadcast the whole frozen base at every start. The
    transformer is referenced (through the model, which is not a module) and runs inside
    :meth:`forward`, so DDP's reducer sees the graph that reaches the adapter's parameters.
    """

    def __init__(self, model: AdaptedModel, settings: StepSettings) -> None:
        super().__init__()
        self.network = model.network
        self.model = model
        self.settings = settings

    def forward(self, batch: MicroBatch) -> torch.Tensor:
        return micro_batch_loss(
            self.model.family,
            self.model.transformer,
            self.network,
            batch,
            self.settings.schedule,
            mixed_precision=self.settings.mixed_precision,
        )


class DataParallel(TrainingStrategy):
    """Every worker holds the whole model; DDP averages the adapter's gradients.

    One worker trains the module without a DDP wrapper: there is nothing to average, and a single
    process has no process group to build one on.
    """

    module: AdapterModule | DistributedDataParallel

    def describe(self) -> str:
        return "data parallel (DistributedDataParallel over the adapter)"

    def prepare(self, model: AdaptedModel, optimizer: torch.optim.Optimizer, settings: StepSettings) -> None:
        self.model, self.optimizer, self.settings = model, optimizer, settings
        module = AdapterModule(model, settings)
        # find_unused_parameters: LyCORIS' module dropout skips layers at random, and a preset may
        # adapt a layer the family's forward never runs; such a layer's gradient is still reduced
        # (as zeros) instead of stalling the reduction. The buffers (LoKr's alpha) are the same on
        # every worker; DDP's default of syncing them costs one small broadcast per forward.
        self.module = (
            DistributedDataParallel(module, find_unused_parameters=True) if self.distributed else module
        )

    def step(self, micro_batches: list[MicroBatch]) -> StepResult:
        model, settings = self.model, self.settings
        return optimizer_step(
            model.family,
            model.transformer,
            model.network,
            model.parameters,
            self.optimizer,
            micro_batches,
            settings.schedule,
            max_grad_norm=settings.max_grad_norm,
            grad_clip_method=settings.grad_clip_method,
            mixed_precision=settings.mixed_precision,
            loss_of=self.module,
            # Gradients are averaged once, in the last micro-step's backward.
            no_sync=self.module.no_sync if isinstance(self.module, DistributedDataParallel) else None,
            reduce_sum=reduce_sum if self.distributed else None,
        )

    def optimizer_state(self) -> dict[str, Any] | None:
        return self.optimizer.state_dict()

    def load(self, folder: Path, saved: Mapping[str, Any], info: CheckpointInfo, *, source: str) -> None:
        self.model.network.load_state_dict(saved["adapter"])
        if saved.get("optimizer") is not None:
            self.optimizer.load_state_dict(saved["optimizer"])
            return
        self.warn_fresh_optimizer(
            source, "holds DeepSpeed optimizer state, and this run does not use DeepSpeed"
        )


class GroupOffload(DataParallel):
    """Data parallel with the frozen base's weights in CPU memory or on disk between layers.

    The base is loaded on the CPU, adapted, then offloaded (diffusers' hooks must wrap LyCORIS'
    forwards); the training forward saves offloaded weights for backward by name
    (:class:`~raytuner.train.offload.OffloadedWeights`).
    """

    def __init__(self, plan: GroupOffloadPlan, *, rank: int, world_size: int, device: torch.device) -> None:
        super().__init__(rank=rank, world_size=world_size, device=device)
        self.plan = plan

    @property
    def base_device(self) -> torch.device:
        return OFFLOAD_DEVICE

    def describe(self) -> str:
        return f"{super().describe()}, base group-offloaded ({self.plan.offload_type})"

    def prepare(self, model: AdaptedModel, optimizer: torch.optim.Optimizer, settings: StepSettings) -> None:
        apply_group_offload(model.transformer, self.plan, onload_device=self.device)
        self.weights = OffloadedWeights(model.transformer, onload_device=self.device)
        super().prepare(model, optimizer, settings)

    def step(self, micro_batches: list[MicroBatch]) -> StepResult:
        with self.weights.saving():
            return super().step(micro_batches)

    def close(self) -> None:
        remove_disk_copy(self.plan)


def build_strategy(job: TrainJob, *, rank: int, world_size: int, device: torch.device) -> TrainingStrategy:
    """The run's strategy, chosen once: DeepSpeed ZeRO when the driver planned it, else data
    parallel, with the base group-offloaded when ``enable_group_offload`` asks for it."""
    if job.deepspeed is not None:
        from raytuner.train.zero import DeepSpeedZero

        return DeepSpeedZero(job.deepspeed, rank=rank, world_size=world_size, device=device)
    offload = plan_group_offload(job.run.training.memory, device=device, run_name=job.run_name, rank=rank)
    if offload is not None:
        return GroupOffload(offload, rank=rank, world_size=world_size, device=device)
    return DataParallel(rank=rank, world_size=world_size, device=device)


def worker_environment(job: TrainJob, device: torch.device) -> dict[str, tuple[str, str]]:
    """Environment variables the run's strategy needs set before it starts in a worker process:
    name -> (value, why), for the worker to set and log where it starts; nothing is set here.

    DeepSpeed picks its accelerator when first imported: on a CPU worker that must be the CPU one.
    A value already in the environment wins.
    """
    if job.deepspeed is not None and device.type == "cpu" and DEEPSPEED_ACCELERATOR_ENV not in os.environ:
        return {DEEPSPEED_ACCELERATOR_ENV: ("cpu", "DeepSpeed's accelerator on a CPU worker")}
    return {}
