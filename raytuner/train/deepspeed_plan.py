"""The DeepSpeed plan: ``deepspeed_config`` (read and checked by the loader, in
raytuner/config/deepspeed.py) completed for the run's worker count, by the driver.

Kept apart from the engine (raytuner/train/zero.py): the plan travels to Ray Train's controller
inside the job, which must unpickle it without importing torch's model stack.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from typing import Any

from raytuner.config import RunConfig
from raytuner.config.deepspeed import DeepSpeedConfigError, DeepSpeedSettings, is_auto
from raytuner.config.paths import display
from raytuner.config.training import UNCLIPPED_OPTIMIZERS, OptimizationSection

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
