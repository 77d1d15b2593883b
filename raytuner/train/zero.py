"""DeepSpeed ZeRO inside a Ray Train worker (SimpleTuner's ``deepspeed_config``).

The loader has read and checked ``deepspeed_config`` (raytuner/config/deepspeed.py), the driver
completed it for the run's worker count (raytuner/train/deepspeed_plan.py); here the engine runs it.

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

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from raytuner.adapters import plain_tensors
from raytuner.train.deepspeed_plan import DeepSpeedPlan
from raytuner.train.state import CheckpointError, CheckpointInfo
from raytuner.train.step import MicroBatch, StepResult, accumulate, micro_batch_loss
from raytuner.train.strategy import StepSettings, TrainingStrategy, reduce_sum
from raytuner.upstream import keep_deepspeed_collectives_on_gloo

if TYPE_CHECKING:
    from raytuner.train.model import AdaptedModel

logger = logging.getLogger(__name__)

ENGINE_FOLDER = "deepspeed"  # inside a raytuner checkpoint folder
ENGINE_TAG = "zero"


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

        if self.device.type == "cpu":
            keep_deepspeed_collectives_on_gloo()
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
