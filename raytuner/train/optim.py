"""The optimiser and learning-rate schedule ``config.json`` asks for, with SimpleTuner's meanings.

Option by option this follows SimpleTuner's trainer, not the option names' everyday sense:

* each optimiser starts from SimpleTuner's own default settings for it (``adamw_bf16`` has
  ``eps=1e-6``, ``torch-adam`` has no weight decay); ``optimizer_config`` overrides them, then
  ``optimizer_beta1``/``optimizer_beta2`` set ``betas``;
* ``prodigy``'s settings set ``lr=1.0`` over ``learning_rate``, as SimpleTuner's do: Prodigy
  finds its own step size and ``lr`` only scales it (``optimizer_config`` may still set ``lr``);
* ``bnb-*`` names need bitsandbytes and a CUDA GPU; where either is missing they are refused
  before any work starts, naming what is missing and an optimiser that runs there;
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

import importlib
import importlib.util
import inspect
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from raytuner.config.surface import option_choices
from raytuner.config.training import OptimizationSection
from raytuner.errors import RaytunerError

logger = logging.getLogger(__name__)


class OptimizerError(RaytunerError, ValueError):
    """A one-line reason the optimiser or its learning-rate schedule cannot be built as configured."""


@dataclass(frozen=True, kw_only=True)
class _Import:
    """An optimiser class from a package outside torch, imported only when a config names it.

    bitsandbytes is optional and cannot even be imported on some machines, so nothing of it may be
    touched before a config asks for it; the other packages are dependencies, imported the same way
    so that a missing one is named rather than failing raytuner's import.
    """

    module: str
    name: str
    package: str
    install: str
    needs_cuda: bool = False
    # An optimiser that runs without this package or a GPU, for the refusal to suggest.
    instead: str = "adamw_bf16"


@dataclass(frozen=True, kw_only=True)
class _OptimizerChoice:
    optimizer_class: type[torch.optim.Optimizer] | _Import
    defaults: Mapping[str, Any]
    # The keyword arguments SimpleTuner's class for this name takes; None: optimizer_class's own.
    accepts: frozenset[str] | None = None


def _choice(
    optimizer_class: type[torch.optim.Optimizer] | _Import,
    accepts: frozenset[str] | None = None,
    **defaults: Any,
) -> _OptimizerChoice:
    return _OptimizerChoice(
        optimizer_class=optimizer_class, defaults=MappingProxyType(defaults), accepts=accepts
    )


_ADAM_BETAS = (0.9, 0.999)
# The betas SimpleTuner gives every optimi optimiser (but Adan), its Lions and prodigy.
_OPTIMI_BETAS = (0.9, 0.99)


def _optimi(name: str) -> _Import:
    return _Import(module="optimi", name=name, package="torch-optimi", install="pip install torch-optimi")


def _bitsandbytes(name: str, *, instead: str) -> _Import:
    return _Import(
        module="bitsandbytes.optim",
        name=name,
        package="bitsandbytes",
        install="pip install 'raytuner[bnb]'",
        # bitsandbytes' 8-bit state and paged buffers are CUDA kernels and CUDA managed memory.
        needs_cuda=True,
        instead=instead,
    )


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
        # torch-optimi, with SimpleTuner's settings verbatim. kahan_sum=True only acts on bf16/fp16
        # weights (optimi keeps float32 ones as they are), so on raytuner's float32 LoKr weights it
        # changes nothing. foreach=True picks optimi's foreach kernels over its Triton ones, as in
        # SimpleTuner; optimi 0.3 flags that choice with a DeprecationWarning.
        "optimi-stableadamw": _choice(
            _optimi("StableAdamW"),
            betas=_OPTIMI_BETAS,
            weight_decay=1e-2,
            eps=1e-6,
            decouple_lr=False,
            max_lr=None,
            kahan_sum=True,
            foreach=True,
        ),
        "optimi-adamw": _choice(
            _optimi("AdamW"),
            betas=_OPTIMI_BETAS,
            eps=1e-6,
            weight_decay=0.0,
            decouple_lr=False,
            kahan_sum=True,
            max_lr=None,
        ),
        "optimi-lion": _choice(
            _optimi("Lion"),
            betas=_OPTIMI_BETAS,
            weight_decay=0.0,
            decouple_lr=False,
            max_lr=None,
            kahan_sum=True,
            foreach=True,
        ),
        "optimi-radam": _choice(
            _optimi("RAdam"),
            betas=_OPTIMI_BETAS,
            weight_decay=0.0,
            eps=1e-6,
            decouple_wd=True,
            decouple_lr=False,
            kahan_sum=True,
            foreach=True,
        ),
        "optimi-ranger": _choice(
            _optimi("Ranger"),
            betas=_OPTIMI_BETAS,
            weight_decay=0.0,
            eps=1e-6,
            k=6,
            alpha=0.5,
            decouple_wd=True,
            decouple_lr=False,
            max_lr=None,
            kahan_sum=True,
            foreach=True,
        ),
        "optimi-adan": _choice(
            _optimi("Adan"),
            betas=(0.98, 0.92, 0.999),
            weight_decay=2e-2,
            eps=1e-6,
            decouple_lr=False,
            max_lr=None,
            adam_wd=False,
            kahan_sum=True,
            foreach=True,
        ),
        "optimi-adam": _choice(
            _optimi("Adam"),
            betas=_OPTIMI_BETAS,
            eps=1e-6,
            weight_decay=0.0,
            decouple_wd=False,
            decouple_lr=False,
            kahan_sum=True,
            max_lr=None,
        ),
        "optimi-sgd": _choice(
            _optimi("SGD"),
            momentum=0,
            weight_decay=0.0,
            dampening=False,
            decouple_wd=False,
            decouple_lr=False,
            max_lr=None,
            torch_init=False,
            kahan_sum=True,
            foreach=True,
        ),
        # SimpleTuner's prodigy is ProdigyPlusScheduleFree (prodigy-plus-schedule-free): Prodigy
        # plus schedule-free averaging, which is only right if the training loop switches the
        # optimiser between train() and eval() around every save and validation. raytuner runs
        # prodigyopt's Prodigy, the same step-size adaptation without that averaging, with the
        # settings of SimpleTuner's prodigy that Prodigy has. Those it lacks (weight_decay_by_lr,
        # prodigy_steps, use_speed, split_groups, split_groups_mean, factored, factored_fp32,
        # fused_back_pass, use_stableadamw, use_cautious, use_grams, use_adopt,
        # stochastic_rounding) are left out rather than dropped with a warning on every run.
        # lr=1.0 overrides learning_rate because SimpleTuner's settings for prodigy do the same.
        "prodigy": _choice(
            _Import(
                module="prodigyopt", name="Prodigy", package="prodigyopt", install="pip install prodigyopt"
            ),
            lr=1.0,
            betas=_OPTIMI_BETAS,
            beta3=None,
            weight_decay=0.0,
            use_bias_correction=False,
            d0=1e-6,
            d_coef=1,
            eps=1e-8,
        ),
        "bnb-adamw8bit": _choice(
            _bitsandbytes("AdamW8bit", instead="adamw_bf16"),
            betas=_ADAM_BETAS,
            weight_decay=1e-2,
            eps=1e-6,
        ),
        "bnb-lion8bit-paged": _choice(
            _bitsandbytes("PagedLion8bit", instead="optimi-lion"),
            betas=_OPTIMI_BETAS,
            weight_decay=0.0,
            min_8bit_size=4096,
        ),
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


def effective_learning_rate(optimization: OptimizationSection, *, world_size: int = 1) -> float:
    """``learning_rate``, scaled as SimpleTuner's ``lr_scale``/``lr_scale_sqrt`` ask."""
    if not optimization.lr_scale:
        return optimization.learning_rate
    samples_per_step = optimization.train_batch_size * optimization.gradient_accumulation_steps * world_size
    factor = math.sqrt(samples_per_step) if optimization.lr_scale_sqrt else samples_per_step
    return optimization.learning_rate * factor


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


def optimizer_settings(optimization: OptimizationSection, *, world_size: int = 1) -> OptimizerSettings:
    """The class and keyword arguments for ``optimization.optimizer``; raises :class:`OptimizerError`."""
    name = optimization.optimizer
    choice = _OPTIMIZERS.get(name)
    if choice is None:
        known = "not supported by raytuner yet" if name in option_choices("optimizer") else "unknown"
        raise OptimizerError(
            f"'optimizer' = {name!r}: {known}; use one of: {', '.join(SUPPORTED_OPTIMIZERS)}"
        )

    optimizer_class = _optimizer_class(name, choice)
    learning_rate = effective_learning_rate(optimization, world_size=world_size)
    given = parse_optimizer_config(optimization.optimizer_config)
    # SimpleTuner's order: learning_rate, then the name's settings (prodigy's lr=1.0 wins), then
    # optimizer_config.
    settings: dict[str, Any] = {"lr": learning_rate}
    settings.update(choice.defaults)
    settings.update(given)
    if (optimization.optimizer_beta1 is None) != (optimization.optimizer_beta2 is None):
        raise OptimizerError(
            "'optimizer_beta1' and 'optimizer_beta2' go together: set both or neither, as SimpleTuner requires"
        )
    if optimization.optimizer_beta1 is not None and optimization.optimizer_beta2 is not None:
        settings["betas"] = (optimization.optimizer_beta1, optimization.optimizer_beta2)

    accepts = choice.accepts if choice.accepts is not None else _keyword_names(optimizer_class)
    ignored = _ignored_options(optimization)
    if "lr" in choice.defaults and "lr" not in given and choice.defaults["lr"] != learning_rate:
        scaled = " after lr_scale" if optimization.lr_scale else ""
        ignored.append(
            f"'optimizer' = {name!r} runs at lr {choice.defaults['lr']:g}, not 'learning_rate' "
            f"({learning_rate:g}{scaled}), as in SimpleTuner, whose settings for it set lr: it finds its "
            "own step size and lr only scales that (1.0 is the advice); set 'optimizer_config' to "
            "'lr=...' to scale it"
        )
    dropped = sorted(key for key in settings if key not in accepts)
    if dropped:
        ignored.append(
            f"'optimizer' = {name!r} takes no {', '.join(dropped)}; ignoring them as SimpleTuner does "
            f"(it takes: {', '.join(sorted(accepts))})"
        )
    kwargs = {key: value for key, value in settings.items() if key in accepts}
    return OptimizerSettings(
        name=name,
        optimizer_class=optimizer_class,
        kwargs=MappingProxyType(kwargs),
        ignored=tuple(ignored),
    )


def _optimizer_class(name: str, choice: _OptimizerChoice) -> type[torch.optim.Optimizer]:
    """The class for ``name``, imported now; refuses a name this machine cannot run, in one line."""
    found = choice.optimizer_class
    if not isinstance(found, _Import):
        return found
    needs = [found.package, "a CUDA GPU"] if found.needs_cuda else [found.package]
    missing = []
    if importlib.util.find_spec(found.module.split(".")[0]) is None:
        missing.append(f"{found.package} ({found.install})")
    if found.needs_cuda and not torch.cuda.is_available():
        missing.append("a CUDA GPU")
    instead = f"use an optimizer that runs here instead, e.g. {found.instead!r}"
    if missing:
        raise OptimizerError(
            f"'optimizer' = {name!r} needs {' and '.join(needs)}; missing here: {', '.join(missing)}; {instead}"
        )
    try:
        return getattr(importlib.import_module(found.module), found.name)
    except (ImportError, AttributeError, RuntimeError, OSError) as error:
        # A package that is installed but does not load (a CUDA library it cannot find, a version
        # without this class) fails here, before any work starts, rather than inside a worker.
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise OptimizerError(
            f"'optimizer' = {name!r}: {found.package} is installed but {found.module}.{found.name} "
            f"does not load ({reason}); {instead}"
        ) from error


def _keyword_names(optimizer_class: type[torch.optim.Optimizer]) -> frozenset[str]:
    parameters = inspect.signature(optimizer_class.__init__).parameters
    return frozenset(parameters) - {"self", "params"}


def _ignored_options(optimization: OptimizationSection) -> list[str]:
    # adam_beta1/2, adam_epsilon and adam_weight_decay reach only a DeepSpeed-owned optimiser in
    # SimpleTuner; the config loader already warns about them (compatibility table), with the fix.
    lines = []
    if optimization.lr_scale_sqrt and not optimization.lr_scale:
        lines.append("'lr_scale_sqrt' does nothing without 'lr_scale': true (as in SimpleTuner)")
    return lines


def build_optimizer(
    parameters: Iterable[torch.nn.Parameter], optimization: OptimizationSection, *, world_size: int = 1
) -> torch.optim.Optimizer:
    """The optimiser ``config.json`` names, over ``parameters``, with SimpleTuner's settings."""
    settings = optimizer_settings(optimization, world_size=world_size)
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
    optimizer: torch.optim.Optimizer, optimization: OptimizationSection, *, total_steps: int
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
    name = optimization.lr_scheduler
    warmup = optimization.lr_warmup_steps
    if name == "constant" and warmup > 0:
        # SimpleTuner's argument parser turns this into constant_with_warmup.
        name = "constant_with_warmup"
    if name == "sine":
        if warmup <= 0:
            raise OptimizerError(
                "'lr_scheduler' = 'sine' needs 'lr_warmup_steps' > 0: it is the half-period of the wave"
            )
        return _wave(
            optimizer,
            optimization.lr_end,
            lambda step: 0.5 * (1 + math.sin(math.pi * step / warmup)),
        )
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
            optimizer,
            optimization.lr_end,
            lambda step: 0.5 * (1 + math.cos(math.pi * step / half_period)),
        )
    if name == "polynomial":
        return _polynomial(optimizer, optimization, total_steps=total_steps)
    if name in ("linear", "constant", "constant_with_warmup", "cosine_with_restarts"):
        # Imported here: the pre-flight check reads this module's optimizer tables on the driver,
        # which loads no model; importing diffusers there costs seconds.
        from diffusers.optimization import get_scheduler

        return get_scheduler(
            name,
            optimizer,
            num_warmup_steps=warmup,
            num_training_steps=total_steps,
            num_cycles=optimization.lr_num_cycles,
            power=optimization.lr_power,
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


def _polynomial(
    optimizer: torch.optim.Optimizer, optimization: OptimizationSection, *, total_steps: int
) -> LambdaLR:
    learning_rate = optimizer.defaults["lr"]
    if not optimization.lr_end < learning_rate:
        raise OptimizerError(
            f"'lr_end' = {optimization.lr_end!r} must be below the learning rate {learning_rate!r} "
            "for 'lr_scheduler' = 'polynomial'"
        )
    if total_steps <= optimization.lr_warmup_steps:
        raise OptimizerError(
            f"'lr_warmup_steps' = {optimization.lr_warmup_steps} leaves no steps to decay over in a "
            f"{total_steps}-step run with 'lr_scheduler' = 'polynomial'"
        )
    # diffusers' get_scheduler does not pass lr_end on, so the schedule is called directly.
    from diffusers.optimization import get_polynomial_decay_schedule_with_warmup

    return get_polynomial_decay_schedule_with_warmup(
        optimizer,
        num_warmup_steps=optimization.lr_warmup_steps,
        num_training_steps=total_steps,
        lr_end=optimization.lr_end,
        power=optimization.lr_power,
    )
