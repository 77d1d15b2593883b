"""``dynamo_backend``: torch.compile of the base transformer on each worker, as SimpleTuner has
Accelerate do it (its TorchDynamoPlugin), with ``dynamo_mode``, ``dynamo_fullgraph``,
``dynamo_dynamic`` and ``dynamo_use_regional_compilation``.

The transformer is compiled in place (``Module.compile``): it stays the same object, so the
validation pipeline, the eval loss and the checkpoints see it unchanged. Nothing is traced until
its first forward, which runs through LyCORIS' LoKr forwards, so the adapter's gradients flow
through the compiled graph. Regional compilation compiles each of the transformer's repeated
blocks instead (one compiled graph reused by every block, a much shorter first step), the rest
running eagerly, as Accelerate's regional compilation does.

Refused, with the reason, where it cannot work: with group offload and with DeepSpeed.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from raytuner.config.training import MemorySection
from raytuner.errors import RaytunerError

logger = logging.getLogger(__name__)

OFF = (None, "no")


class CompileError(RaytunerError):
    """A dynamo_backend this run cannot compile its transformer with."""


def compile_options(memory: MemorySection) -> dict[str, Any] | None:
    """torch.compile's keyword arguments for the run's ``dynamo_*`` keys; None when it is off."""
    if memory.dynamo_backend in OFF:
        return None
    options: dict[str, Any] = {"backend": memory.dynamo_backend}
    # SimpleTuner passes a mode only when one other than "auto" is named.
    if memory.dynamo_mode not in (None, "auto"):
        options["mode"] = memory.dynamo_mode
    if memory.dynamo_fullgraph:
        options["fullgraph"] = True
    if memory.dynamo_dynamic:
        options["dynamic"] = True
    return options


def compile_problem(memory: MemorySection) -> str | None:
    """Why the run's ``dynamo_backend`` cannot compile its transformer, in one line; None if it can."""
    backend = memory.dynamo_backend
    if backend in OFF:
        return None
    head = f"'dynamo_backend' = '{backend}'"
    if memory.enable_group_offload:
        return (
            f"{head}: not with enable_group_offload (diffusers' offload hooks move each block's "
            "weights on and off the device around its forward, and raytuner saves the offloaded "
            "weights for backward by name; neither survives tracing); set dynamo_backend to no or "
            "turn group offload off"
        )
    if memory.deepspeed is not None:
        return (
            f"{head}: not with deepspeed_config (ZeRO gathers each layer's partitioned weights in "
            "module hooks around the forward, which raytuner's in-place compile would trace over); "
            "set dynamo_backend to no or remove deepspeed_config"
        )
    # Accelerate's names include backends torch no longer ships; what runs is torch's to say.
    available = torch._dynamo.list_backends(exclude_tags=())
    if backend not in available:
        return (
            f"{head}: this torch has no such compiler backend; expected one of: "
            f"{', '.join(name for name in ('eager', 'aot_eager', 'inductor', 'cudagraphs') if name in available)}"
            " (or no)"
        )
    return None


def repeated_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The items of each ``ModuleList`` under ``module`` whose items are all of one class (the
    transformer blocks), outermost first and not looked into: what regional compilation compiles."""
    blocks: list[torch.nn.Module] = []
    for child in module.children():
        if isinstance(child, torch.nn.ModuleList) and len(child) > 1 and len({type(i) for i in child}) == 1:
            blocks.extend(child)
        else:
            blocks.extend(repeated_blocks(child))
    return blocks


def compile_transformer(transformer: torch.nn.Module, memory: MemorySection) -> int:
    """Compile ``transformer`` in place as the ``dynamo_*`` keys say; returns the number of modules
    compiled (0: off). Call it once the adapter is applied, before the first forward."""
    options = compile_options(memory)
    if options is None:
        return 0
    problem = compile_problem(memory)
    if problem:
        raise CompileError(problem)
    targets = repeated_blocks(transformer) if memory.dynamo_use_regional_compilation else []
    if memory.dynamo_use_regional_compilation and not targets:
        logger.warning(
            "dynamo_use_regional_compilation: no repeated blocks found; compiling the whole transformer"
        )
    for module in targets or [transformer]:
        module.compile(**options)
    logger.info(
        "torch.compile (%s) of %s",
        ", ".join(f"{key}={value}" for key, value in options.items()),
        f"{len(targets)} repeated blocks" if targets else "the whole transformer",
    )
    return len(targets) or 1
