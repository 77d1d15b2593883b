"""The optimiser and learning-rate schedule ``config.json`` asks for, with SimpleTuner's meanings.

Option by option this follows SimpleTuner's trainer, not the option names' everyday sense:

* each optimiser starts from SimpleTuner's own default settings for it (``adamw_bf16`` has
  ``eps=1e-6``, ``torch-adam`` has no weight decay); ``optimizer_config`` overrides them, then
  ``optimizer_beta1``/``optimizer_beta2`` set ``betas``;
* ``adam_beta1``, ``adam_beta2``, ``adam_epsilon`` and ``adam_weight_decay`` do not reach these
  optimisers: SimpleTuner hands them only to a DeepSpeed-owned optimiser. raytuner keeps that; the
  config loader warns when one of them is set;
* settings an optimiser class does not take are dropped with a warning, as SimpleTuner does;
* ``lr_scale`` multiplies the learning rate by batch size × accumulation steps × workers, and
  ``lr_scale_sqrt`` (only together with ``lr_scale``) by its square root.

Schedules are stepped once per optimiser step. SimpleTuner scales its step counts by the number
of processes because Accelerate steps a prepared scheduler once per process; counted in
optimiser steps the two agree.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from diffusers.optimization import get_polynomial_decay_schedule_with_warmup, get_scheduler
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from raytuner.config.surface import option_choices
from raytuner.config.training import TrainingConfig

logger = logging.getLogger(__name__)


class OptimizerError(ValueError):
    """A one-line reason the optimiser or its learning-rate schedule cannot be built as configured."""


@dataclass(frozen=True, kw_only=True)
class _OptimizerChoice:
    optimizer_class: type[torch.optim.Optimizer]
    defaults: Mapping[str, Any]
    # The keyword arguments SimpleTuner's class for this name takes; None: optimizer_class's own.
    accepts: frozenset[str] | None = None


def _choice(
    optimizer_class: type[torch.optim.Optimizer], accepts: frozenset[str] | None = None, **defaults: Any
) -> _OptimizerChoice:
    return _OptimizerChoice(
        optimizer_class=optimizer_class, defaults=MappingProxyType(defaults), accepts=accepts
    )


_ADAM_BETAS = (0.9, 0.999)

# SimpleTuner's default settings per optimiser (helpers/training/optimizer_param.py).
_OPTIMIZERS: Mapping[str, _OptimizerChoice] = MappingProxyType(
    {
        # SimpleTuner's adamw_bf16 is its own AdamW for bf16 weights only, with stochastic rounding to
        # make up for bf16's short mantissa. raytuner keeps LoKr weights in float32, which needs no
        # such help, so the name runs torch.optim.AdamW with adamw_bf16's defaults and takes only the
        # settings adamw_bf16's class takes.
        "adamw_bf16": _choice(
            torch.optim.AdamW,
            accepts=frozenset({"lr", "betas", "eps", "weight_decay"}),
            betas=_ADAM_BETAS,
            weight_decay=1e-2,
            eps=1e-6,
        ),
        "torch-adam": _choice(torch.optim.Adam, betas=_ADAM_BETAS, weight_decay=0.0, eps=1e-8, amsgrad=False),
        "torch-adamw": _choice(
            torch.optim.AdamW, betas=_ADAM_BETAS, weight_decay=1e-2, eps=1e-8, amsgrad=False
        ),
        "torch-sgd": _choice(torch.optim.SGD, momentum=0.0, weight_decay=0.0, dampening=0.0, nesterov=False),
        "torch-radam": _choice(torch.optim.RAdam, betas=_ADAM_BETAS, weight_decay=0.0, eps=1e-8),
        "torch-nadam": _choice(
            torch.optim.NAdam, betas=_ADAM_BETAS, weight_decay=0.0, eps=1e-8, momentum_decay=4e-3
        ),
        "torch-rmsprop": _choice(torch.optim.RMSprop, alpha=0.99, weight_decay=0.0, eps=1e-8, momentum=0.0),
        "torch-adagrad": _choice(torch.optim.Adagrad, lr_decay=0.0, weight_decay=0.0, eps=1e-10),
        "torch-adadelta": _choice(torch.optim.Adadelta, rho=0.9, weight_decay=0.0, eps=1e-6),
        "torch-adafactor": _choice(
            torch.optim.Adafactor, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0
        ),
        "torch-adamax": _choice(torch.optim.Adamax, betas=_ADAM_BETAS, weight_decay=0.0, eps=1e-8),
        "torch-asgd": _choice(torch.optim.ASGD, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0.0),
    }
)

SUPPORTED_OPTIMIZERS: tuple[str, ...] = tuple(_OPTIMIZERS)

# Every schedule SimpleTuner offers (its list ships in raytuner/config/data/config_keys.tsv).
SUPPORTED_LR_SCHEDULERS: tuple[str, ...] = option_choices("lr_scheduler")

# SimpleTuner's cosine wave falls back to this half-period when lr_warmup_steps is 0.
_COSINE_FALLBACK_HALF_PERIOD = 1000

_OPTIMIZER_CONFIG_FORM = "comma-separated key=value pairs, e.g. 'eps=1e-6,weight_decay=0.0'"


@dataclass(frozen=True, kw_only=True)
class OptimizerSettings:
    """What :func:`build_optimizer` will construct, worked out without any parameters."""

    name: str
    optimizer_class: type[torch.optim.Optimizer]
    kwargs: Mapping[str, Any]
    # One line per configured option that changes nothing here, for the caller to log.
    ignored: tuple[str, ...]


def effective_learning_rate(training: TrainingConfig, *, world_size: int = 1) -> float:
    """``learning_rate``, scaled as SimpleTuner's ``lr_scale``/``lr_scale_sqrt`` ask."""
    if not training.lr_scale:
        return training.learning_rate
    samples_per_step = training.train_batch_size * training.gradient_accumulation_steps * world_size
    factor = math.sqrt(samples_per_step) if training.lr_scale_sqrt else samples_per_step
    return training.learning_rate * factor


def parse_optimizer_config(text: str | None) -> dict[str, Any]:
    """SimpleTuner's ``optimizer_config`` string (``eps=1e-6,amsgrad=true``) as keyword arguments.

    Values become bool (``true``/``false``), None (``none``), int, float, else stay strings. Where
    SimpleTuner reads a value as a number raytuner does too; it also reads ``-1`` and ``1e3`` as
    numbers, which SimpleTuner leaves as strings that no optimiser accepts.
    """
    settings: dict[str, Any] = {}
    for entry in (text or "").split(","):
        if not entry.strip():
            continue  # a trailing comma
        parts = entry.split("=")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise OptimizerError(
                f"'optimizer_config' entry {entry.strip()!r}: expected key=value; "
                f"write {_OPTIMIZER_CONFIG_FORM}"
            )
        settings[parts[0].strip()] = _parse_value(parts[1].strip())
    return settings


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return text


def optimizer_settings(training: TrainingConfig, *, world_size: int = 1) -> OptimizerSettings:
    """The class and keyword arguments for ``training.optimizer``; raises :class:`OptimizerError`."""
    name = training.optimizer
    choice = _OPTIMIZERS.get(name)
    if choice is None:
        known = "not supported by raytuner yet" if name in option_choices("optimizer") else "unknown"
        raise OptimizerError(
            f"'optimizer' = {name!r}: {known}; use one of: {', '.join(SUPPORTED_OPTIMIZERS)}"
        )

    settings: dict[str, Any] = {"lr": effective_learning_rate(training, world_size=world_size)}
    settings.update(choice.defaults)
    settings.update(parse_optimizer_config(training.optimizer_config))
    if (training.optimizer_beta1 is None) != (training.optimizer_beta2 is None):
        raise OptimizerError(
            "'optimizer_beta1' and 'optimizer_beta2' go together: set both or neither, as SimpleTuner requires"
        )
    if training.optimizer_beta1 is not None and training.optimizer_beta2 is not None:
        settings["betas"] = (training.optimizer_beta1, training.optimizer_beta2)

    accepts = choice.accepts if choice.accepts is not None else _keyword_names(choice.optimizer_class)
    ignored = _ignored_options(training)
    dropped = sorted(key for key in settings if key not in accepts)
    if dropped:
        ignored.append(
            f"'optimizer' = {name!r} takes no {', '.join(dropped)}; ignoring them as SimpleTuner does "
            f"(it takes: {', '.join(sorted(accepts))})"
        )
    kwargs = {key: value for key, value in settings.items() if key in accepts}
    return OptimizerSettings(
        name=name,
        optimizer_class=choice.optimizer_class,
        kwargs=MappingProxyType(kwargs),
        ignored=tuple(ignored),
    )


def _keyword_names(optimizer_class: type[torch.optim.Optimizer]) -> frozenset[str]:
    parameters = inspect.signature(optimizer_class.__init__).parameters
    return frozenset(parameters) - {"self", "params"}


def _ignored_options(training: TrainingConfig) -> list[str]:
    # adam_beta1/2, adam_epsilon and adam_weight_decay reach only a DeepSpeed-owned optimiser in
    # SimpleTuner; the config loader already warns about them (compatibility table), with the fix.
    lines = []
    if training.lr_scale_sqrt and not training.lr_scale:
        lines.append("'lr_scale_sqrt' does nothing without 'lr_scale': true (as in SimpleTuner)")
    return lines


def build_optimizer(
    parameters: Iterable[torch.nn.Parameter], training: TrainingConfig, *, world_size: int = 1
) -> torch.optim.Optimizer:
    """The optimiser ``config.json`` names, over ``parameters``, with SimpleTuner's settings."""
    settings = optimizer_settings(training, world_size=world_size)
    for line in settings.ignored:
        logger.warning(line)
    trainable = list(parameters)
    if not trainable:
        raise OptimizerError("nothing to optimise: no trainable parameters were given")
    try:
        return settings.optimizer_class(trainable, **settings.kwargs)
    except (TypeError, ValueError) as error:
        # Values from optimizer_config reach the class unchecked; its own check names the problem.
        raise OptimizerError(
            f"'optimizer' = {settings.name!r}: {settings.optimizer_class.__name__} refused its settings "
            f"(its defaults, optimizer_config, optimizer_beta1/2): {error}"
        ) from error


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, training: TrainingConfig, *, total_steps: int
) -> LRScheduler:
    """SimpleTuner's ``lr_scheduler`` over ``total_steps`` optimiser steps; step it after each one.

    ``linear``, ``constant`` and ``constant_with_warmup`` are diffusers' schedules, as in SimpleTuner.
    ``sine`` and ``cosine`` are SimpleTuner's own waves between ``learning_rate`` and ``lr_end`` whose
    half-period is ``lr_warmup_steps`` (they have no warm-up). ``polynomial`` warms up, then decays
    to ``lr_end`` with power ``lr_power``. ``cosine_with_restarts`` is diffusers' schedule with
    ``lr_num_cycles`` hard restarts: SimpleTuner's own version never moves the learning rate (its
    scheduler is stepped with an argument it does not take, and it warns that it misbehaves), so
    raytuner runs what the name and ``lr_num_cycles`` describe instead.
    """
    name = training.lr_scheduler
    warmup = training.lr_warmup_steps
    if name == "constant" and warmup > 0:
        # SimpleTuner's argument parser turns this into constant_with_warmup.
        name = "constant_with_warmup"
    if name == "sine":
        if warmup <= 0:
            raise OptimizerError(
                "'lr_scheduler' = 'sine' needs 'lr_warmup_steps' > 0: it is the half-period of the wave"
            )
        return _wave(optimizer, training.lr_end, lambda step: 0.5 * (1 + math.sin(math.pi * step / warmup)))
    if name == "cosine":
        half_period = warmup
        if half_period <= 0:
            half_period = _COSINE_FALLBACK_HALF_PERIOD
            logger.warning(
                "'lr_scheduler' = 'cosine' with 'lr_warmup_steps' = 0: using a half-period of %d steps, "
                "as SimpleTuner does",
                half_period,
            )
        return _wave(
            optimizer, training.lr_end, lambda step: 0.5 * (1 + math.cos(math.pi * step / half_period))
        )
    if name == "polynomial":
        return _polynomial(optimizer, training, total_steps=total_steps)
    if name in ("linear", "constant", "constant_with_warmup", "cosine_with_restarts"):
        return get_scheduler(
            name,
            optimizer,
            num_warmup_steps=warmup,
            num_training_steps=total_steps,
            num_cycles=training.lr_num_cycles,
            power=training.lr_power,
        )
    raise OptimizerError(
        f"'lr_scheduler' = {name!r}: unknown; use one of: {', '.join(SUPPORTED_LR_SCHEDULERS)}"
    )


def _wave(optimizer: torch.optim.Optimizer, lr_end: float, shape: Callable[[int], float]) -> LambdaLR:
    """Each group's learning rate moves between its starting value (shape 1) and ``lr_end`` (shape 0)."""

    def factor(base_lr: float) -> Callable[[int], float]:
        floor = lr_end / base_lr
        return lambda step: floor + (1.0 - floor) * shape(step)

    return LambdaLR(optimizer, [factor(group["lr"]) for group in optimizer.param_groups])


def _polynomial(optimizer: torch.optim.Optimizer, training: TrainingConfig, *, total_steps: int) -> LambdaLR:
    learning_rate = optimizer.defaults["lr"]
    if not training.lr_end < learning_rate:
        raise OptimizerError(
            f"'lr_end' = {training.lr_end!r} must be below the learning rate {learning_rate!r} "
            "for 'lr_scheduler' = 'polynomial'"
        )
    if total_steps <= training.lr_warmup_steps:
        raise OptimizerError(
            f"'lr_warmup_steps' = {training.lr_warmup_steps} leaves no steps to decay over in a "
            f"{total_steps}-step run with 'lr_scheduler' = 'polynomial'"
        )
    # diffusers' get_scheduler does not pass lr_end on, so the schedule is called directly.
    return get_polynomial_decay_schedule_with_warmup(
        optimizer,
        num_warmup_steps=training.lr_warmup_steps,
        num_training_steps=total_steps,
        lr_end=training.lr_end,
        power=training.lr_power,
    )
