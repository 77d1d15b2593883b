"""DeepSpeed ZeRO inside a Ray Train worker (SimpleTuner's ``deepspeed_config``).

The loader has read and checked ``deepspeed_config`` (raytuner/config/deepspeed.py); here the
plan is completed for the run's worker count, and the engine runs it.

raytuner owns what ``config.json`` already says, so a DeepSpeed file may leave those values to it
(absent or ``"auto"``, as with Accelerate) but may not contradict them: the batch shape
(``train_batch_size``, ``gradient_accumulation_steps``, the worker count), clipping
(``max_grad_norm``), precision (``mixed_precision``) and the optimizer and its schedule, which
raytuner builds from ``config.json`` and hands to the engine.

How the pieces sit on the engine:

- The engine wraps one module holding the frozen base transformer and its LyCORIS network, so
  ZeRO-3 partitions the base weights across the workers (the memory it saves).
- The LoKr factors are small (kilobytes to a few megabytes) and are read inside the adapted
  layers' forward, which ZeRO-3's hooks do not see as theirs. They are kept whole on every worker
  (ZeRO-3 "persistent" parameters: their gradients and optimizer state are still partitioned),
  so the EMA, validation and the exported adapter read them as with data parallelism.
- Mixed precision is raytuner's own (base in bfloat16 under autocast, LoKr in float32), not
  DeepSpeed's ``bf16`` mode, which would cast the LoKr weights to bfloat16 as well.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from raytuner.adapters import plain_tensors
from raytuner.config import RunConfig
from raytuner.config.deepspeed import DeepSpeedConfigError, DeepSpeedSettings, is_auto
from raytuner.config.paths import display
from raytuner.config.training import OptimizationSection
from raytuner.train.state import CheckpointError, CheckpointInfo
from raytuner.train.step import UNCLIPPED_OPTIMIZERS, MicroBatch, StepResult, accumulate, micro_batch_loss
from raytuner.train.strategy import StepSettings, TrainingStrategy, reduce_sum

if TYPE_CHECKING:
    from raytuner.train.model import AdaptedModel

logger = logging.getLogger(__name__)

ENGINE_FOLDER = "deepspeed"  # inside a raytuner checkpoint folder
ENGINE_TAG = "zero"
# Sections raytuner fills from config.json; a file may leave them out or say "auto".
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


@dataclass(frozen=True, kw_only=True)
class DeepSpeedPlan:
    """The engine configuration a worker passes to ``deepspeed.initialize`` (minus the adapter's
    persistence threshold, which needs the model), with the notes the driver logs once."""

    config: dict[str, Any]
    settings: DeepSpeedSettings
    notes: tuple[str, ...] = ()

    @property
    def stage(self) -> int:
        return self.settings.stage

    @property
    def offload_optimizer(self) -> str:
        return self.settings.offload_optimizer

    @property
    def offload_param(self) -> str:
        return self.settings.offload_param

    def describe(self) -> str:
        return self.settings.describe()


def plan_deepspeed(
    settings: DeepSpeedSettings, optimization: OptimizationSection, *, world_size: int, where: str
) -> DeepSpeedPlan:
    """The engine configuration for ``world_size`` workers; raise one error line when the
    user's batch keys contradict config.json and the worker count."""
    config: dict[str, Any] = json.loads(json.dumps(settings.config))
    notes = list(settings.notes)
    wanted = {
        "train_micro_batch_size_per_gpu": optimization.train_batch_size,
        "gradient_accumulation_steps": optimization.gradient_accumulation_steps,
        "train_batch_size": optimization.train_batch_size
        * optimization.gradient_accumulation_steps
        * world_size,
    }
    for key in BATCH_KEYS:
        given = config.get(key)
        if given is not None and not is_auto(given) and given != wanted[key]:
            raise DeepSpeedConfigError(
                f"{where}: deepspeed_config '{key}' = {given!r} but config.json and the worker count give "
                f"{wanted[key]} (train_batch_size {optimization.train_batch_size} x gradient_accumulation_steps "
                f'{optimization.gradient_accumulation_steps} x {world_size} workers): set it to "auto" or remove it'
            )
        config[key] = wanted[key]

    clipping = config.get("gradient_clipping")
    unclipped = optimization.optimizer in UNCLIPPED_OPTIMIZERS
    if clipping is None or is_auto(clipping):
        clipping = 0.0 if unclipped else float(optimization.max_grad_norm or 0.0)
        config["gradient_clipping"] = clipping
    if clipping and optimization.grad_clip_method == "value":
        notes.append(
            f"DeepSpeed clips gradients by their global norm: max_grad_norm {clipping} is applied as a norm "
            "limit, not per value (grad_clip_method value has no DeepSpeed equivalent)"
        )
    # Client optimizers (every raytuner optimizer) are what ZeRO calls "untested"; with the
    # optimizer state offloaded they run on the CPU partitions, which DeepSpeed only allows when
    # told that its own CPU Adam is not wanted.
    config["zero_allow_untested_optimizer"] = True
    if settings.offload_optimizer != "none":
        config.setdefault("zero_force_ds_cpu_optimizer", False)
    config.setdefault("steps_per_print", 2**31 - 1)  # raytuner's progress line says it already
    config.setdefault("wall_clock_breakdown", False)
    return DeepSpeedPlan(config=config, settings=settings, notes=tuple(notes))


def deepspeed_plan(run: RunConfig, *, world_size: int) -> DeepSpeedPlan | None:
    """The run's DeepSpeed plan (None without ``deepspeed_config``); raises one error line."""
    settings = run.training.memory.deepspeed
    if settings is None:
        return None
    where = display(run.sources["config"])
    plan = plan_deepspeed(settings, run.training.optimization, world_size=world_size, where=where)
    missing = deepspeed_missing(plan)
    if missing is not None:
        raise DeepSpeedConfigError(f"{where}: 'deepspeed_config': {missing}")
    return plan


def deepspeed_missing(plan: DeepSpeedPlan) -> str | None:
    """What keeps this machine from running ``plan`` (the package, an extension), or None."""
    # find_spec, not import: importing DeepSpeed picks an accelerator and logs; the driver only asks.
    if importlib.util.find_spec("deepspeed") is None:
        return "DeepSpeed is not installed: pip install 'raytuner[deepspeed]'"
    if "nvme" in (plan.offload_optimizer, plan.offload_param):
        from deepspeed.ops.op_builder import AsyncIOBuilder

        if not AsyncIOBuilder().is_compatible(verbose=False):
            return (
                "NVMe offload needs DeepSpeed's async_io extension, which cannot be built here (libaio "
                "missing?): install libaio-dev and reinstall deepspeed, or offload to cpu"
            )
    return None


class AdaptedTransformer(torch.nn.Module):
    """The base transformer and its LyCORIS network as the one module DeepSpeed wraps."""

    def __init__(self, transformer: torch.nn.Module, network: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        self.network = network

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.transformer(*args, **kwargs)

    # Returns a new dict of plain tensors, never the ``destination`` a caller passes, so it does
    # not match the overloads of Module.state_dict.
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return plain_tensors(super().state_dict(*args, **kwargs))


class EngineForward:
    """What the family's ``predict`` calls during training: the engine, with the base's dtype."""

    def __init__(self, engine: Any, dtype: torch.dtype) -> None:
        self.engine = engine
        self.dtype = dtype

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)


class DeepSpeedZero(TrainingStrategy):
    """One worker's DeepSpeed engine around the adapted transformer and raytuner's optimizer: the
    engine scales by the accumulation, reduces, clips (``gradient_clipping``) and steps."""

    def __init__(self, plan: DeepSpeedPlan, *, rank: int, world_size: int, device: torch.device) -> None:
        super().__init__(rank=rank, world_size=world_size, device=device)
        self.plan = plan
        if rank == 0:
            logger.info("DeepSpeed: %s", plan.describe())
            for note in plan.notes:
                logger.warning(note)

    @property
    def collective(self) -> bool:
        """ZeRO-3: the base's weights are split over the workers, so every forward of the base
        (evaluation, validation) runs on every worker in lockstep."""
        return self.plan.stage == 3 and self.distributed

    def describe(self) -> str:
        return f"DeepSpeed {self.plan.describe()}"

    def prepare(self, model: AdaptedModel, optimizer: torch.optim.Optimizer, settings: StepSettings) -> None:
        import deepspeed

        self.model, self.settings = model, settings
        self.parameters = list(model.parameters)
        config = json.loads(json.dumps(self.plan.config))
        if self.plan.stage == 3:
            # Keep every LoKr factor whole (see the module docstring); the base's layers are far
            # larger than any factor, so they stay partitioned.
            needed = max(p.numel() for p in self.parameters) + 1
            zero = config["zero_optimization"]
            zero["stage3_param_persistence_threshold"] = max(
                int(zero.get("stage3_param_persistence_threshold", 0) or 0), needed
            )
        self.engine, _, _, _ = deepspeed.initialize(
            model=AdaptedTransformer(model.transformer, model.network),
            optimizer=optimizer,
            config=config,
            dist_init_required=False,
        )
        self.forward = EngineForward(self.engine, dtype=getattr(model.transformer, "dtype", torch.float32))
        if self.plan.stage == 3:
            # Persistent parameters are gathered on first use and then kept; gather them now, so
            # the step-0 evaluation and the EMA see them whole before any forward.
            # ZeRO-3 gives each parameter its all_gather when it partitions the model.
            self.parameters[0].all_gather(param_list=self.parameters)  # type: ignore[attr-defined]
            if any(p.numel() == 0 for p in self.parameters):
                raise RuntimeError("ZeRO-3 kept LoKr tensors partitioned; expected them whole (persistent)")

    def step(self, micro_batches: list[MicroBatch]) -> StepResult:
        """One optimiser step through the engine: it scales by the accumulation, reduces, clips."""
        model, settings = self.model, self.settings

        def loss_of(batch: MicroBatch) -> torch.Tensor:
            return micro_batch_loss(
                model.family,
                self.forward,
                model.network,
                batch,
                settings.schedule,
                mixed_precision=settings.mixed_precision,
            )

        def backward(loss: torch.Tensor) -> None:
            self.engine.backward(loss)
            self.engine.step()  # an optimiser step only at the accumulation boundary

        steps_before = self.engine.global_steps
        tally = accumulate(loss_of, micro_batches, backward)
        if self.engine.global_steps != steps_before + 1:
            raise RuntimeError(
                f"DeepSpeed stepped {self.engine.global_steps - steps_before} times for one raytuner step: "
                "its gradient_accumulation_steps and raytuner's disagree"
            )
        grad_norm = self.engine.get_global_grad_norm()
        return tally.result(
            float(grad_norm) if grad_norm is not None else float("nan"),
            reduce_sum=reduce_sum if self.distributed else None,
            device=self.engine.device,
        )

    def save(self, folder: Path) -> None:
        """Every worker writes its shard of the engine state (optimizer partitions) into ``folder``."""
        self.engine.save_checkpoint(
            str(folder / ENGINE_FOLDER), tag=ENGINE_TAG, exclude_frozen_parameters=True, save_latest=False
        )

    def optimizer_state(self) -> dict[str, Any] | None:
        return None  # the engine's, in deepspeed/ beside the training state

    def load(self, folder: Path, saved: Mapping[str, Any], info: CheckpointInfo, *, source: str) -> None:
        if saved_with_engine(folder) and info.world_size == self.world_size:
            problem = engine_state_problem(folder, world_size=self.world_size)
            if problem is not None:
                raise CheckpointError(problem)
            self.load_engine(folder)
            return
        self.set_adapter(saved["adapter"])
        reason = (
            f"holds DeepSpeed state partitioned for {info.world_size} workers, this run has {self.world_size}"
            if saved_with_engine(folder)
            else "holds no DeepSpeed state (written without deepspeed_config)"
        )
        self.warn_fresh_optimizer(source, reason)

    def load_engine(self, folder: Path) -> None:
        """Restore the engine state written by :meth:`save` with the same worker count."""
        path, _ = self.engine.load_checkpoint(
            str(folder / ENGINE_FOLDER),
            tag=ENGINE_TAG,
            load_module_strict=False,  # the frozen base is not in the checkpoint
            load_lr_scheduler_states=False,  # raytuner's own schedule is restored beside it
        )
        if path is None:
            raise FileNotFoundError(f"{folder / ENGINE_FOLDER}: no DeepSpeed state with tag {ENGINE_TAG}")

    def set_adapter(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load adapter weights into the module and the engine's master copies (a checkpoint from
        another worker count, whose optimizer partitions do not fit this one)."""
        from deepspeed.utils import safe_set_full_fp32_param

        self.model.network.load_state_dict(state)  # the whole LoKr factors every worker holds
        for parameter in self.parameters:
            safe_set_full_fp32_param(parameter, parameter.detach().to(torch.float32).clone())


def engine_state_problem(folder: Path, *, world_size: int) -> str | None:
    """Why the engine state in a checkpoint folder is not whole, or None.

    Every worker uploads its own optimizer partition into the shared folder; rank 0's manifest
    cannot list the others' files, so each rank's partition is looked for here.
    """
    engine_dir = folder / ENGINE_FOLDER / ENGINE_TAG
    for rank in range(world_size):
        partition = engine_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        if not partition.is_file() or partition.stat().st_size == 0:
            return f"{folder}: worker {rank}'s DeepSpeed optimizer partition is missing; the checkpoint is incomplete"
    return None


def saved_with_engine(folder: Path) -> bool:
    """Whether a raytuner checkpoint folder holds DeepSpeed engine state."""
    return (folder / ENGINE_FOLDER / ENGINE_TAG).is_dir()
