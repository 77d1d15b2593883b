"""What a sweep may vary, and the search-space distributions it varies them with.

Every trial of a sweep trains on the one cache built before the first trial, so only settings
that leave the cached latents and text conditioning as they are may differ between trials. The
allow-lists below are those settings; a key that would change the cache is refused by name,
with the reason, and anything else that is not on the lists is refused with the list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from raytuner.config.surface import config_keys, dataset_keys, did_you_mean

Target = Literal["training", "lycoris"]

# config.json keys a search may vary: optimisation, schedule, regularisation and the flow-matching
# sigma schedule. None of them is read by the cache build.
SWEEPABLE_TRAINING = frozenset(
    {
        "learning_rate",
        "lr_scheduler",
        "lr_warmup_steps",
        "lr_num_cycles",
        "lr_power",
        "lr_end",
        "lr_scale",
        "lr_scale_sqrt",
        "optimizer",
        "optimizer_beta1",
        "optimizer_beta2",
        "max_grad_norm",
        "grad_clip_method",
        "train_batch_size",
        "gradient_accumulation_steps",
        "caption_dropout_probability",
        "flow_schedule_shift",
        "flow_schedule_auto_shift",
        "flow_sigmoid_scale",
        "flow_use_uniform_schedule",
        "flow_use_beta_schedule",
        "flow_beta_schedule_alpha",
        "flow_beta_schedule_beta",
        "use_ema",
        "ema_decay",
    }
)
# lycoris_config.json options a search may vary: the LoKr factor, dims, alpha and dropouts.
SWEEPABLE_LYCORIS = frozenset(
    {"factor", "linear_dim", "linear_alpha", "dropout", "rank_dropout", "module_dropout"}
)
# Settings every trial shares that a sweep may set (in "fixed") but not search over: how long a
# trial trains and how often it evaluates, validates and checkpoints.
TRIAL_SETTINGS = frozenset(
    {
        "max_train_steps",
        "num_train_epochs",
        "eval_steps_interval",
        "eval_timesteps",
        "num_eval_images",
        "validation_step_interval",
        "validation_num_inference_steps",
        "validation_guidance",
        "validation_guidance_rescale",
        "checkpoint_step_interval",
        "checkpoints_total_limit",
        "gradient_checkpointing",
        "report_to",
    }
)
# config.json keys that change what the cache holds (or which cache a run reads): a sweep over
# them would need one cache per value.
CACHE_KEYS: dict[str, str] = {
    "resolution": "the latents' size",
    "resolution_type": "the latents' size",
    "minimum_image_size": "which images are cached",
    "aspect_bucket_rounding": "the aspect buckets",
    "aspect_bucket_alignment": "the aspect buckets",
    "disable_bucket_pruning": "which images are cached",
    "pretrained_model_name_or_path": "the VAE and text encoders",
    "pretrained_vae_model_name_or_path": "the VAE",
    "revision": "the VAE and text encoders",
    "model_family": "the VAE and text encoders",
    "model_flavour": "the VAE and text encoders",
    "mixed_precision": "the encoders' precision",
    "base_model_precision": "the model's precision",
    "data_backend_config": "the datasets",
    "lycoris_config": "the adapter file itself",
    "validation_prompt": "the text cache (validation prompts are encoded with the captions)",
    "validation_negative_prompt": "the text cache (the negative prompt is encoded with the captions)",
    "user_prompt_library": "the text cache (its prompts are encoded with the captions)",
    "validation_prompt_library": "the text cache (the built-in library is encoded with the captions)",
    "vae_batch_size": "nothing trained (it only paces the cache build)",
    "vae_cache_ondemand": "how the cache is built",
    "seed": "the epoch plan every trial shares (sweep 'seed' seeds the sampler instead)",
    "output_dir": "where the sweep writes (each trial gets its own folder under it)",
}


def classify_key(written: str, *, lycoris_enabled: bool) -> tuple[str, Target]:
    """``(key, target)`` for a key a sweep may vary; ``ValueError`` with the reason otherwise."""
    key = written[2:] if written.startswith("--") else written
    if key in SWEEPABLE_TRAINING:
        return key, "training"
    if key in SWEEPABLE_LYCORIS:
        if not lycoris_enabled:
            raise ValueError(
                "is a lycoris_config.json option, but config.json names no lycoris_config; "
                "set lora_type lycoris and lycoris_config"
            )
        return key, "lycoris"
    return key, _refusal(key)


def classify_fixed_key(written: str, *, lycoris_enabled: bool) -> tuple[str, Target]:
    """Like :func:`classify_key`, also allowing the per-trial settings of :data:`TRIAL_SETTINGS`."""
    key = written[2:] if written.startswith("--") else written
    if key in TRIAL_SETTINGS:
        return key, "training"
    return classify_key(written, lycoris_enabled=lycoris_enabled)


def _refusal(key: str) -> Target:
    if key in CACHE_KEYS:
        raise ValueError(
            f"changes {CACHE_KEYS[key]}, which every trial shares from one cache; "
            "run one sweep per value instead"
        )
    if key in dataset_keys():
        raise ValueError(
            "is a multidatabackend.json key: it changes the cached latents or captions, which every "
            "trial shares from one cache; run one sweep per value instead"
        )
    allowed = ", ".join(sorted(SWEEPABLE_TRAINING | SWEEPABLE_LYCORIS))
    if key in config_keys():
        raise ValueError(f"cannot be swept; a sweep varies one of: {allowed}")
    raise ValueError(
        f"is not a key raytuner knows{did_you_mean(key, SWEEPABLE_TRAINING | SWEEPABLE_LYCORIS)}"
    )


Kind = Literal["uniform", "loguniform", "int", "choice"]
KINDS: tuple[str, ...] = ("uniform", "loguniform", "int", "choice")


@dataclass(frozen=True, kw_only=True)
class Parameter:
    """One search axis: a config.json or lycoris_config.json key and its distribution."""

    key: str
    target: Target
    kind: Kind
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: int | None = None
    values: tuple[Any, ...] = ()

    def corners(self) -> tuple[Any, ...]:
        """The values that bound the range: checking them checks every value in between."""
        if self.kind == "choice":
            return self.values
        if self.kind == "int":
            return (int(self.low or 0), int(self.high or 0))
        return (self.low, self.high)

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return any(_same(value, choice) for choice in self.values)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        assert self.low is not None and self.high is not None
        return self.low <= value <= self.high

    def describe(self) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(str(value) for value in self.values)
        scale = "log-uniform" if self.kind == "loguniform" or self.log else "uniform"
        what = "integers" if self.kind == "int" else "numbers"
        return f"{scale} {what} in [{self.low:g}, {self.high:g}]"

    def distribution(self) -> Any:
        """The Optuna distribution Ray Tune's ``OptunaSearch`` samples this axis from."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "choice":
            return CategoricalDistribution(list(self.values))
        assert self.low is not None and self.high is not None
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=self.step or 1)
        return FloatDistribution(self.low, self.high, log=self.kind == "loguniform")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return bool(a == b)


def parse_parameter(key: str, target: Target, spec: Any, *, where: str) -> Parameter:
    """A ``parameters`` entry: ``{"type": ..., "low": ..., "high": ...}``, ``{"type": "choice",
    "values": [...]}``, or a bare list as shorthand for a choice. ``ValueError`` names the problem."""
    if isinstance(spec, list):
        spec = {"type": "choice", "values": spec}
    if not isinstance(spec, dict):
        raise ValueError(
            f'{where}: expected an object such as {{"type": "loguniform", "low": 1e-5, "high": 1e-3}} '
            f"or a list of choices, got {spec!r}"
        )
    kind = spec.get("type")
    if kind not in KINDS:
        raise ValueError(
            f"{where}: 'type' = {kind!r}: expected one of {', '.join(KINDS)}{did_you_mean(str(kind), KINDS)}"
        )
    allowed = (
        {"type", "values"}
        if kind == "choice"
        else {"type", "low", "high"} | ({"log", "step"} if kind == "int" else set())
    )
    extra = sorted(set(spec) - allowed)
    if extra:
        raise ValueError(
            f"{where}: {', '.join(map(repr, extra))} not used with type {kind}; expected only {sorted(allowed)}"
        )
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise ValueError(f"{where}: 'values' = {values!r}: expected a non-empty list of choices")
        if any(isinstance(value, dict | list) for value in values):
            raise ValueError(
                f"{where}: 'values': expected plain values (numbers, text, true/false), got {values!r}"
            )
        for index, value in enumerate(values):
            if any(_same(value, other) for other in values[:index]):
                raise ValueError(f"{where}: 'values' lists {value!r} twice; list each choice once")
        return Parameter(key=key, target=target, kind="choice", values=tuple(values))
    low, high = (
        _number(spec.get(name), f"{where}: '{name}'", integer=kind == "int") for name in ("low", "high")
    )
    if not low < high:
        raise ValueError(
            f"{where}: the range [{low:g}, {high:g}] is empty: expected 'low' < 'high'; "
            'to fix a value for every trial, put it in "fixed" instead'
        )
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"{where}: 'low' = {low:g}: a log-uniform range needs 'low' > 0")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ValueError(f"{where}: 'log' = {log!r}: expected true or false")
    if log and low < 1:
        raise ValueError(f"{where}: 'low' = {low:g}: a log-scale integer range needs 'low' >= 1")
    step = spec.get("step")
    if step is not None:
        step = int(_number(step, f"{where}: 'step'", integer=True))
        if step < 1 or log:
            raise ValueError(f"{where}: 'step' = {step}: expected an integer >= 1, and no 'log' with it")
    return Parameter(key=key, target=target, kind=kind, low=low, high=high, log=log, step=step)


def _number(value: Any, where: str, *, integer: bool) -> float:
    expected = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        shown = "missing" if value is None else repr(value)
        raise ValueError(f"{where} = {shown}: expected {expected} (a JSON number, not text)")
    if integer and value != int(value):
        raise ValueError(f"{where} = {value!r}: expected {expected}")
    return value
