"""SimpleTuner's ``deepspeed_config``, read and checked once, when the config is loaded.

``deepspeed_config`` is what SimpleTuner users pass: a path to a DeepSpeed JSON file, the JSON
itself as text, or (in ``config.json``) an inline object. raytuner also generates the two
configurations most LoKr runs want, by name: ``zero2`` and ``zero3``, each with ``-offload`` for
the optimizer state in CPU memory.

Everything that does not depend on the worker count is settled here: the ZeRO stage, where state
is offloaded, the sections raytuner owns (optimizer, scheduler), fp16 and bf16. The batch shape
needs the worker count, so raytuner/train/zero.py completes the plan from these settings when a
run is laid out on Ray, without reading the file again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raytuner.errors import RaytunerError

# Generated configurations: name -> (ZeRO stage, optimizer state offloaded to CPU memory).
GENERATED_CONFIGS: dict[str, tuple[int, bool]] = {
    "zero2": (2, False),
    "zero2-offload": (2, True),
    "zero3": (3, False),
    "zero3-offload": (3, True),
}
SUPPORTED_STAGES = (2, 3)
OWNED_SECTIONS = {
    "optimizer": "raytuner builds the optimizer from config.json's 'optimizer' and 'learning_rate'",
    "scheduler": "raytuner builds the schedule from config.json's 'lr_scheduler' and 'lr_warmup_steps'",
}
OFFLOAD_DEVICES = ("none", "cpu", "nvme")


class DeepSpeedConfigError(RaytunerError, ValueError):
    """A ``deepspeed_config`` raytuner cannot run; the message is one line naming key and fix."""


@dataclass(frozen=True, kw_only=True)
class DeepSpeedSettings:
    """A checked ``deepspeed_config``: the user's settings with raytuner's sections removed, and
    what the run will do with them. Plain data, so it travels to the workers in the job."""

    config: dict[str, Any]
    stage: int
    offload_optimizer: str
    offload_param: str
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        parts = [f"ZeRO stage {self.stage}"]
        if self.offload_optimizer != "none":
            parts.append(f"optimizer state offloaded to {self.offload_optimizer}")
        if self.offload_param != "none":
            parts.append(f"parameters offloaded to {self.offload_param}")
        return ", ".join(parts)


def read_deepspeed_config(
    value: str | Mapping[str, Any], *, where: str, base_dir: Path | None = None
) -> dict[str, Any]:
    """``deepspeed_config`` as a dict: a generated name, inline JSON, a mapping or a file path."""
    label = f"{where}: 'deepspeed_config'"
    if isinstance(value, Mapping):
        return json.loads(json.dumps(value))  # a deep, JSON-clean copy
    text = value.strip()
    if text in GENERATED_CONFIGS:
        stage, offload = GENERATED_CONFIGS[text]
        return generated_config(stage, offload_optimizer=offload)
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as error:
            raise DeepSpeedConfigError(
                f"{label} is not valid JSON ({error.msg} at character {error.pos}): fix the text, or give a file path"
            ) from None
    else:
        path = Path(text).expanduser()
        if not path.is_absolute() and base_dir is not None and not path.exists():
            path = base_dir / path
        if not path.is_file():
            names = ", ".join(GENERATED_CONFIGS)
            raise DeepSpeedConfigError(
                f"{label} = {text!r}: expected a DeepSpeed JSON file, JSON text or one of {names}; no such file"
            )
        try:
            parsed = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise DeepSpeedConfigError(
                f"{path}: not valid JSON ({error.msg}, line {error.lineno}): fix the file"
            ) from None
    if not isinstance(parsed, dict):
        raise DeepSpeedConfigError(
            f"{label}: expected a JSON object of DeepSpeed settings, got {type(parsed).__name__}"
        )
    return parsed


def generated_config(stage: int, *, offload_optimizer: bool = False) -> dict[str, Any]:
    """raytuner's defaults for ZeRO ``stage`` (2 or 3); batch and clipping come from config.json."""
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if stage == 3:
        # Gather nothing into one file at save time: raytuner exports the adapter itself.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {"zero_optimization": zero}


def _offload_device(zero: Mapping[str, Any], section: str, *, where: str) -> str:
    spec = zero.get(section)
    if spec is None:
        return "none"
    if not isinstance(spec, Mapping):
        raise DeepSpeedConfigError(
            f'{where}: \'zero_optimization.{section}\' = {spec!r}: expected an object such as {{"device": "cpu"}}'
        )
    device = str(spec.get("device", "none")).lower()
    if device not in OFFLOAD_DEVICES:
        raise DeepSpeedConfigError(
            f"{where}: 'zero_optimization.{section}.device' = {device!r}: expected one of {', '.join(OFFLOAD_DEVICES)}"
        )
    if device == "nvme" and not spec.get("nvme_path"):
        raise DeepSpeedConfigError(
            f"{where}: 'zero_optimization.{section}': device nvme needs 'nvme_path', a folder on a fast local disk"
        )
    return device


def is_auto(value: Any) -> bool:
    """Accelerate's "auto": the value is left to whoever owns it."""
    return isinstance(value, str) and value.strip().lower() == "auto"


def check_deepspeed(user: Mapping[str, Any], *, mixed_precision: str, where: str) -> DeepSpeedSettings:
    """Check a DeepSpeed config against what raytuner owns; raise one error line."""
    config: dict[str, Any] = json.loads(json.dumps(user))
    notes: list[str] = []
    for section, owner in OWNED_SECTIONS.items():
        if section in config:
            raise DeepSpeedConfigError(
                f"{where}: deepspeed_config has a '{section}' section: {owner}; remove the section"
            )
    zero = config.get("zero_optimization")
    if not isinstance(zero, dict):
        raise DeepSpeedConfigError(
            f"{where}: deepspeed_config has no 'zero_optimization' object: expected e.g. "
            '{"zero_optimization": {"stage": 2}}, or "deepspeed_config": "zero2"'
        )
    stage = zero.get("stage", 0)
    if stage not in SUPPORTED_STAGES:
        raise DeepSpeedConfigError(
            f"{where}: 'zero_optimization.stage' = {stage!r}: expected 2 or 3 (for plain data parallelism remove deepspeed_config)"
        )
    offload_optimizer = _offload_device(zero, "offload_optimizer", where=where)
    offload_param = _offload_device(zero, "offload_param", where=where)
    if offload_param != "none" and stage != 3:
        raise DeepSpeedConfigError(
            f"{where}: 'zero_optimization.offload_param' needs stage 3 (stage is {stage}): set \"stage\": 3 or remove offload_param"
        )
    # Accelerate-style "auto" inside zero_optimization: DeepSpeed's own defaults decide.
    for key in [key for key, value in zero.items() if is_auto(value)]:
        del zero[key]

    if config.get("fp16", {}).get("enabled") is True:
        raise DeepSpeedConfigError(
            f"{where}: deepspeed_config enables fp16: fp16 training is not supported; remove the fp16 section and use mixed_precision bf16"
        )
    bf16 = config.pop("bf16", None) or config.pop("bfloat16", None)
    if isinstance(bf16, Mapping) and bf16.get("enabled") is True:
        if mixed_precision != "bf16":
            raise DeepSpeedConfigError(
                f"{where}: deepspeed_config enables bf16 but mixed_precision is {mixed_precision!r}: "
                'set "mixed_precision": "bf16" in config.json or remove the bf16 section'
            )
        notes.append(
            "deepspeed_config bf16: trained as raytuner's mixed_precision bf16 (base in bfloat16 under "
            "autocast, LoKr weights in float32)"
        )
    return DeepSpeedSettings(
        config=config,
        stage=int(stage),
        offload_optimizer=offload_optimizer,
        offload_param=offload_param,
        notes=tuple(notes),
    )


def parse_deepspeed(
    value: str | Mapping[str, Any], *, mixed_precision: str, where: str, base_dir: Path | None = None
) -> DeepSpeedSettings:
    """``deepspeed_config`` read (file, text, object or generated name) and checked."""
    user = read_deepspeed_config(value, where=where, base_dir=base_dir)
    return check_deepspeed(user, mixed_precision=mixed_precision, where=where)
