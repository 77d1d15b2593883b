"""``TrainingConfig``: the options of SimpleTuner's ``config.json`` that raytuner reads, in
frozen, typed sections.

The file stays SimpleTuner's: one flat object of option names. Each option is a field of exactly
one section (``model``, ``data``, ``flow``, ``optimization``, ``memory``, ``checkpoints``,
``validation``, ``tracking``, ``ray``), under SimpleTuner's own name, so a user's key and the
field are the same word, and each component of raytuner is handed the section it works from.
Defaults are SimpleTuner's (``raytuner/config/data/config_keys.tsv``); a ``Literal`` names the
values raytuner runs, and a rule's ``choices`` (SimpleTuner's list) the ones it refuses by name.

Every section is frozen: the loader builds them once, and nothing changes a config after it is
loaded; a variant (a sweep's trial, the demo's step count, paths placed under shared storage) is
a new config made by :func:`replace_options`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from raytuner.config.deepspeed import DeepSpeedSettings
from raytuner.config.fields import derived, rule
from raytuner.config.surface import option_choices, value_aliases
from raytuner.config.webhooks import WebhookTarget


def _choices(name: str) -> tuple[str, ...]:
    return option_choices(name)


# SimpleTuner's evaluation_type choices (its cmd_args.py); None and "none" turn evaluation off.
EvaluationType = Literal["none", "clip"]
EVALUATION_TYPES: tuple[str, ...] = get_args(EvaluationType)
# SimpleTuner's default for pretrained_evaluation_model_name_or_path.
DEFAULT_EVALUATION_MODEL = "openai/clip-vit-large-patch14-336"

# SimpleTuner's optimizers raytuner runs (raytuner/train/optim.py builds each); the rest of
# SimpleTuner's list is refused by name when the config is loaded, before any work starts. The
# bnb-* names load everywhere: they need bitsandbytes and a CUDA GPU, which only the machine that
# builds the optimizer can tell, so raytuner/train/optim.py refuses them there where either is missing.
OptimizerName = Literal[
    "adamw_bf16",
    "torch-adam",
    "torch-adamw",
    "torch-sgd",
    "torch-radam",
    "torch-nadam",
    "torch-rmsprop",
    "torch-adagrad",
    "torch-adadelta",
    "torch-adafactor",
    "torch-adamax",
    "torch-asgd",
    "optimi-stableadamw",
    "optimi-adamw",
    "optimi-lion",
    "optimi-radam",
    "optimi-ranger",
    "optimi-adan",
    "optimi-adam",
    "optimi-sgd",
    "prodigy",
    "bnb-adamw8bit",
    "bnb-lion8bit-paged",
]
RAYTUNER_OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
# SimpleTuner never clips for the optimisers that bound their own updates.
UNCLIPPED_OPTIMIZERS: tuple[OptimizerName, ...] = ("optimi-stableadamw", "prodigy")

# SimpleTuner's base_model_precision values raytuner runs (raytuner/quantize.py quantises
# with optimum-quanto or torchao, installed with the "quantization" extra).
QuantizedPrecision = Literal[
    "int8-quanto",
    "fp8-quanto",
    "int4-quanto",
    "int2-quanto",
    "fp8uz-quanto",
    "int8-torchao",
    "fp8wo-torchao",
    "fp8-torchao",
]
QUANTIZED_PRECISIONS: tuple[str, ...] = get_args(QuantizedPrecision)
BaseModelPrecision = Literal["no_change", QuantizedPrecision]

LrScheduler = Literal[
    "linear", "sine", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
]
# bf16: the frozen base in bfloat16 under autocast, the LoKr weights in float32 (SimpleTuner's
# meaning); fp16 and fp8 training are not implemented.
MixedPrecision = Literal["no", "bf16"]
ReportTo = Literal[
    "simpletuner", "tensorboard", "wandb", "swanlab", "comet_ml", "custom-tracker", "all", "none"
]
ResolutionType = Literal["pixel", "area", "pixel_area"]
GroupOffloadType = Literal["block_level", "leaf_level"]

# SimpleTuner's attention_mechanism choices (its field registry, in its order).
ATTENTION_MECHANISMS: tuple[str, ...] = (
    "diffusers",
    "xformers",
    "sla",
    "sageattention",
    "sageattention-int8-fp16-triton",
    "sageattention-int8-fp16-cuda",
    "sageattention-int8-fp8-cuda",
    "flash-attn",
    "flash-attn-hub",
    "flash-attn-2",
    "flash-attn-varlen-hub",
    "flash-attn-3",
    "flash-attn-3-hub",
    "flash-attn-3-varlen",
    "flash-attn-3-varlen-hub",
    "flash-attn-4-hub",
    "flex",
    "metal-flash-attention",
    "metal-flash-attention-int8",
    "metal-flash-attention-int4",
    "native",
    "cudnn",
    "native-efficient",
    "native-flash",
    "native-math",
    "native-npu",
    "native-xla",
)
# SimpleTuner's dynamo_backend values (Accelerate's DynamoBackend, lower-case); "no" is off. Which
# ones run is torch's to say (torch._dynamo.list_backends), checked before a run starts.
DynamoBackend = Literal[
    "no",
    "eager",
    "aot_eager",
    "inductor",
    "aot_ts_nvfuser",
    "nvprims_nvfuser",
    "cudagraphs",
    "ofi",
    "fx2trt",
    "onnxrt",
    "tensorrt",
    "aot_torchxla_trace_once",
    "torchxla_trace_once",
    "ipex",
    "tvm",
    "hpu_backend",
]
# SimpleTuner reads Accelerate's enum names too (INDUCTOR, aot-eager) and none/disabled as off.
DYNAMO_ALIASES: dict[str, str] = {
    "none": "no",
    "disabled": "no",
    **{
        spelling: name
        for name in get_args(DynamoBackend)
        for spelling in (name.upper(), name.replace("_", "-"))
    },
}
# torch.compile's modes; SimpleTuner reads "auto" (and no value) as torch's default.
DynamoMode = Literal["auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
# The ones raytuner runs: diffusers' default attention and the diffusers attention backends
# SimpleTuner maps its names to (raytuner/models/base.py: ATTENTION_BACKENDS). SLA, SageAttention
# (SimpleTuner's own training/inference switch, sageattention_usage) and Metal flash attention are
# SimpleTuner's own kernels, refused by name.
AttentionMechanism = Literal[
    "diffusers",
    "xformers",
    "flash-attn",
    "flash-attn-hub",
    "flash-attn-2",
    "flash-attn-varlen-hub",
    "flash-attn-3",
    "flash-attn-3-hub",
    "flash-attn-3-varlen",
    "flash-attn-3-varlen-hub",
    "flash-attn-4-hub",
    "flex",
    "native",
    "cudnn",
    "native-efficient",
    "native-flash",
    "native-math",
    "native-npu",
    "native-xla",
]


@dataclass(frozen=True, kw_only=True)
class ModelSection:
    """Which base model, how it is loaded, and the adapter trained on it."""

    model_family: str
    model_flavour: str | None = None
    model_type: Literal["lora", "full"] = "lora"
    lora_type: Literal["standard", "lycoris"] = "standard"
    lycoris_config: Path | None = field(
        default=Path("config/lycoris_config.json"), metadata=rule(path="input_file")
    )
    pretrained_model_name_or_path: str | None = None
    pretrained_vae_model_name_or_path: str | None = None
    revision: str | None = None
    # The frozen base quantised (raytuner/quantize.py); SimpleTuner's other precisions are
    # refused here, before any work starts.
    base_model_precision: BaseModelPrecision = field(
        default="no_change", metadata=rule(choices=_choices("base_model_precision"))
    )
    # cpu: quantise before moving to the device; accelerator: on the device. SimpleTuner's
    # pipeline-level quantisation is refused: raytuner quantises only the transformer it trains.
    quantize_via: Literal["cpu", "accelerator"] = field(
        default="accelerator", metadata=rule(choices=_choices("quantize_via"))
    )
    mixed_precision: MixedPrecision = field(
        default="bf16", metadata=rule(choices=_choices("mixed_precision"))
    )


@dataclass(frozen=True, kw_only=True)
class DataSection:
    """Where the datasets are described, and how images are sized, bucketed and encoded."""

    data_backend_config: Path = field(metadata=rule(path="input_file"))
    resolution: int | float = field(default=1024, metadata=rule(gt=0))
    resolution_type: ResolutionType = "pixel_area"
    minimum_image_size: int | float | None = field(default=None, metadata=rule(ge=0))
    aspect_bucket_rounding: int | None = field(default=2, metadata=rule(ge=1, le=9))
    aspect_bucket_alignment: int = field(default=64, metadata=rule(ge=1))
    disable_bucket_pruning: bool = False
    # A bucket smaller than one global batch, in a dataset without its own repeats, is repeated
    # until it fills one (SimpleTuner's oversubscription) instead of stopping the run.
    allow_dataset_oversubscription: bool = False
    vae_batch_size: int = field(default=4, metadata=rule(ge=1))
    vae_cache_ondemand: bool = False
    # diffusers' VAE slicing and tiling in the cache build's VAE encoder actors (raytuner's only
    # VAE encoding): less memory for large batches or images.
    vae_enable_slicing: bool = False
    vae_enable_tiling: bool = False
    # Captions per text-encoder forward pass in the text cache build; the text_embeds dataset's
    # own text_encoder_batch_size wins (raytuner/cache/settings.py: text_batch_size).
    text_encoder_batch_size: int = field(default=1, metadata=rule(ge=1))
    caption_dropout_probability: float = field(default=0.1, metadata=rule(ge=0, le=1))
    # Delete the files of local and aws datasets that cannot be decoded (a dataset's own key wins).
    delete_problematic_images: bool = False


@dataclass(frozen=True, kw_only=True)
class FlowSection:
    """The flow-matching noise schedule: which sigmas training draws."""

    flow_schedule_shift: float = field(default=3.0, metadata=rule(ge=0))
    flow_schedule_auto_shift: bool = False
    flow_sigmoid_scale: float = field(default=1.0, metadata=rule(gt=0))
    flow_use_uniform_schedule: bool = False
    flow_use_beta_schedule: bool = False
    flow_beta_schedule_alpha: float = field(default=2.0, metadata=rule(gt=0))
    flow_beta_schedule_beta: float = field(default=2.0, metadata=rule(gt=0))


@dataclass(frozen=True, kw_only=True)
class OptimizationSection:
    """The optimizer, its schedule, the batch shape, how long to train, clipping and EMA."""

    learning_rate: float = field(default=4e-07, metadata=rule(gt=0, example="1e-4"))
    lr_scheduler: LrScheduler = field(
        default="constant_with_warmup",
        metadata=rule(choices=_choices("lr_scheduler"), value_aliases=value_aliases().get("lr_scheduler")),
    )
    lr_warmup_steps: int = field(default=0, metadata=rule(ge=0))
    lr_num_cycles: int = field(default=1, metadata=rule(ge=1))
    lr_power: float = field(default=0.8, metadata=rule(gt=0))
    lr_end: float = field(default=4e-07, metadata=rule(ge=0, example="4e-7"))
    lr_scale: bool = False
    lr_scale_sqrt: bool = False
    optimizer: OptimizerName = field(default="adamw_bf16", metadata=rule(choices=_choices("optimizer")))
    adam_beta1: float = field(default=0.9, metadata=rule(ge=0, le=1))
    adam_beta2: float = field(default=0.999, metadata=rule(ge=0, le=1))
    adam_epsilon: float = field(default=1e-08, metadata=rule(gt=0, example="1e-8"))
    adam_weight_decay: float = field(default=1e-02, metadata=rule(ge=0))
    optimizer_beta1: float | None = field(default=None, metadata=rule(ge=0, le=1))
    optimizer_beta2: float | None = field(default=None, metadata=rule(ge=0, le=1))
    optimizer_config: str | None = None
    train_batch_size: int = field(default=4, metadata=rule(ge=1))
    gradient_accumulation_steps: int = field(default=1, metadata=rule(ge=1))
    max_train_steps: int | None = field(default=None, metadata=rule(ge=0, example="10000"))
    num_train_epochs: int = field(default=1, metadata=rule(ge=0))
    max_grad_norm: float = field(default=2.0, metadata=rule(ge=0))
    grad_clip_method: Literal["value", "norm"] = "value"
    use_ema: bool = False
    ema_decay: float = field(default=0.995, metadata=rule(gt=0, le=1))


@dataclass(frozen=True, kw_only=True)
class MemorySection:
    """How the model fits in memory: activation checkpointing and one memory strategy — group
    offload (one small GPU) or DeepSpeed ZeRO (several), its plan parsed once, when loading."""

    gradient_checkpointing: bool = True
    # Checkpoint only every Nth transformer block (SimpleTuner's block_index % N == 0): less
    # recomputation, more activation memory; 1 or unset is every block.
    gradient_checkpointing_interval: int | None = field(default=None, metadata=rule(ge=1))
    disable_benchmark: bool = False
    # The training transformer's attention (and the validation pipeline's, the same object):
    # diffusers' default, or one of diffusers' attention backends (its kernel must be installed).
    attention_mechanism: AttentionMechanism = field(
        default="diffusers", metadata=rule(choices=ATTENTION_MECHANISMS)
    )
    # torch.compile of the base transformer on each worker, in place (raytuner/train/compile.py).
    dynamo_backend: DynamoBackend | None = field(default=None, metadata=rule(value_aliases=DYNAMO_ALIASES))
    dynamo_mode: DynamoMode | None = None
    dynamo_fullgraph: bool = False
    dynamo_dynamic: bool = False
    dynamo_use_regional_compilation: bool = False
    enable_group_offload: bool = False
    group_offload_type: GroupOffloadType = "block_level"
    group_offload_blocks_per_group: int = field(default=1, metadata=rule(ge=1))
    group_offload_use_stream: bool = False
    group_offload_to_disk_path: Path | None = field(default=None, metadata=rule(path="output"))
    group_offload_text_encoder: bool = False
    group_offload_vae: bool = False
    enable_model_cpu_offload: bool = False
    # A DeepSpeed JSON file, JSON text, an inline object, or a generated one: zero2, zero3,
    # zero2-offload, zero3-offload (raytuner/config/deepspeed.py reads it into ``deepspeed``).
    deepspeed_config: str | dict[str, Any] | None = None
    deepspeed: DeepSpeedSettings | None = field(default=None, metadata=derived())


@dataclass(frozen=True, kw_only=True)
class CheckpointSection:
    checkpoint_step_interval: int | None = field(default=500, metadata=rule(ge=1))
    checkpoints_total_limit: int | None = field(default=5, metadata=rule(ge=1))
    resume_from_checkpoint: str | None = "latest"


@dataclass(frozen=True, kw_only=True)
class ValidationSection:
    """Validation pictures during training, the eval loss, and CLIP scores."""

    validation_prompt: str | None = None
    validation_negative_prompt: str = "blurry, cropped, ugly"
    validation_resolution: str = "256"
    validation_guidance: float = field(default=7.5, metadata=rule(ge=0))
    # Read and ignored: these pipelines have no guidance rescale (compatibility table), so any number is fine.
    validation_guidance_rescale: float | None = 0.0
    validation_num_inference_steps: int = field(default=30, metadata=rule(ge=1))
    validation_seed: int | None = field(default=None, metadata=rule(ge=0))
    validation_step_interval: int | None = field(default=100, metadata=rule(ge=0))  # 0: at the end only
    validation_disable_unconditional: bool = False
    validation_prompt_library: bool = False
    user_prompt_library: Path | None = field(default=None, metadata=rule(path="input_file"))
    num_eval_images: int = field(default=4, metadata=rule(ge=1))
    eval_steps_interval: int | None = field(default=None, metadata=rule(ge=1))
    eval_timesteps: int = field(default=28, metadata=rule(ge=1))
    # "clip": every validation round scores its images against their prompts with the CLIP model
    # below and logs clip_score (raytuner/evaluate/clip_score.py, raytuner/train/validate.py).
    evaluation_type: EvaluationType | None = None
    pretrained_evaluation_model_name_or_path: str = DEFAULT_EVALUATION_MODEL


@dataclass(frozen=True, kw_only=True)
class TrackingSection:
    """Where a run's numbers, pictures, events and adapters are published."""

    report_to: ReportTo = "none"
    tracker_project_name: str = "simpletuner"
    tracker_run_name: str = "simpletuner-testing"
    # How W&B shows validation images: one image per key ("gallery") or one table per round.
    tracker_image_layout: Literal["gallery", "table"] = "gallery"
    hub_model_id: str | None = None
    push_to_hub: bool = False
    push_checkpoints_to_hub: bool = False
    # Publishing (raytuner/hub.py): checkpoint uploads off the training thread, the repo's
    # visibility when it is created, and the card's not-for-all-audiences tag, which SimpleTuner
    # adds unless the model is marked safe for work.
    push_to_hub_background: bool = False
    model_card_private: bool = False
    model_card_safe_for_work: bool = False
    model_card_note: str | None = None
    hf_token: str | None = field(default=None, repr=False)
    # Webhooks: a JSON file, JSON text, or an inline object or list of them, read once by
    # raytuner/config/webhooks.py into ``webhooks``. The reporting interval is SimpleTuner's
    # seconds between progress events; unset sends one per step, as SimpleTuner does.
    webhook_config: str | dict[str, Any] | list[Any] | None = None
    webhook_reporting_interval: float | None = field(default=None, metadata=rule(gt=0))
    webhooks: tuple[WebhookTarget, ...] = field(default=(), metadata=derived())


@dataclass(frozen=True, kw_only=True)
class RaySection:
    """raytuner's own keys: how the run is laid out on Ray (raytuner/train/settings.py)."""

    # accelerate's process count; unset, SimpleTuner (and raytuner) use every GPU found.
    num_processes: int | None = field(default=None, metadata=rule(ge=1))
    ray_num_workers: int | None = field(default=None, metadata=rule(ge=1))
    ray_gpus_per_worker: float | None = field(default=None, metadata=rule(ge=0))
    ray_cpus_per_worker: float | None = field(default=None, metadata=rule(gt=0))
    ray_storage_path: str | None = None
    ray_max_failures: int | None = field(default=None, metadata=rule(ge=-1))


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """Everything from ``config.json``, typed, in sections. Paths are resolved by the loader."""

    output_dir: Path = field(default=Path("simpletuner-results"), metadata=rule(path="output"))
    seed: int | None = field(default=None, metadata=rule(ge=0))
    model: ModelSection
    data: DataSection
    flow: FlowSection = field(default_factory=FlowSection)
    optimization: OptimizationSection = field(default_factory=OptimizationSection)
    memory: MemorySection = field(default_factory=MemorySection)
    checkpoints: CheckpointSection = field(default_factory=CheckpointSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    ray: RaySection = field(default_factory=RaySection)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> TrainingConfig:
        """A config from flat option values as Python already holds them (benchmarks, tests):
        sorted into sections, taken as given; ``load_config`` is the way in for a user's file."""
        top, by_section = _split_by_section(options)
        for name, section in section_types().items():
            if name in by_section or name in ("model", "data"):
                top[name] = section(**by_section.get(name, {}))
        return cls(**top)

    def flat(self) -> dict[str, Any]:
        """The options as config.json spells them: one flat mapping, parsed plans left out."""
        values: dict[str, Any] = {}
        for name, section in option_sections().items():
            owner = self if section is None else getattr(self, section)
            values[name] = getattr(owner, name)
        return values


def section_types() -> dict[str, type]:
    """The sections of ``TrainingConfig``: attribute name -> section class."""
    return dict(_SECTION_TYPES)


def option_sections(*, with_derived: bool = False) -> dict[str, str | None]:
    """Every config.json option -> the section holding it (None: ``TrainingConfig`` itself).

    ``with_derived`` adds the parsed plans (``memory.deepspeed``, ``tracking.webhooks``).
    """
    options: dict[str, str | None] = {}
    for item in dataclasses.fields(TrainingConfig):
        if item.name in _SECTION_TYPES:
            for option in dataclasses.fields(_SECTION_TYPES[item.name]):
                if with_derived or not option.metadata.get("derived"):
                    options[option.name] = item.name
        else:
            options[item.name] = None
    return options


def replace_options(training: TrainingConfig, changes: Mapping[str, Any]) -> TrainingConfig:
    """A new config with these options (config.json names, or a parsed plan) replaced.

    Values are taken as given: coercion and rules belong to the caller (the loader, or
    raytuner/config/overrides.py for a sweep's values).
    """
    top, by_section = _split_by_section(changes)
    for section, values in by_section.items():
        top[section] = dataclasses.replace(getattr(training, section), **values)
    return dataclasses.replace(training, **top)


def _split_by_section(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``options`` (config.json names, or a parsed plan) sorted into ``TrainingConfig``'s own
    fields and each section's; an unknown name is a ``KeyError``."""
    locations = option_sections(with_derived=True)
    top: dict[str, Any] = {}
    by_section: dict[str, dict[str, Any]] = {}
    for key, value in options.items():
        if key not in locations:
            raise KeyError(f"TrainingConfig has no option {key!r}")
        section = locations[key]
        if section is None:
            top[key] = value
        else:
            by_section.setdefault(section, {})[key] = value
    return top, by_section


_SECTION_CLASSES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        ModelSection,
        DataSection,
        FlowSection,
        OptimizationSection,
        MemorySection,
        CheckpointSection,
        ValidationSection,
        TrackingSection,
        RaySection,
    )
}
# Annotations are strings here (postponed evaluation), so sections are found by class name.
_SECTION_TYPES: dict[str, type] = {
    item.name: _SECTION_CLASSES[str(item.type)]
    for item in dataclasses.fields(TrainingConfig)
    if str(item.type) in _SECTION_CLASSES
}
