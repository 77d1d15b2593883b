"""``TrainingConfig``: the options of SimpleTuner's ``config.json`` that raytuner reads.

Field names are SimpleTuner's option names, so a user's key and the field are the same word.
Defaults are SimpleTuner's (``raytuner/config/data/config_keys.tsv``); choices come from the
same list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raytuner.config.fields import rule
from raytuner.config.surface import option_choices, value_aliases


def _choices(name: str) -> tuple[str, ...]:
    return option_choices(name)


# SimpleTuner's evaluation_type choices (its cmd_args.py); None and "none" turn evaluation off.
EVALUATION_TYPES: tuple[str, ...] = ("none", "clip")
# SimpleTuner's default for pretrained_evaluation_model_name_or_path.
DEFAULT_EVALUATION_MODEL = "openai/clip-vit-large-patch14-336"


# SimpleTuner's optimizers raytuner runs (raytuner/train/optim.py builds each); the rest of
# SimpleTuner's list is refused by name when the config is loaded, before any work starts. The
# bnb-* names load everywhere: they need bitsandbytes and a CUDA GPU, which only the machine that
# builds the optimizer can tell, so raytuner/train/optim.py refuses them there where either is missing.
RAYTUNER_OPTIMIZERS: tuple[str, ...] = (
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
)


# SimpleTuner's base_model_precision values raytuner runs (raytuner/quantize.py quantises
# with optimum-quanto or torchao, installed with the "quantization" extra).
QUANTIZED_PRECISIONS: tuple[str, ...] = (
    "int8-quanto",
    "fp8-quanto",
    "int4-quanto",
    "int2-quanto",
    "fp8uz-quanto",
    "int8-torchao",
    "fp8wo-torchao",
    "fp8-torchao",
)


@dataclass(kw_only=True)
class TrainingConfig:
    """Everything from ``config.json``, typed. Paths are resolved by the loader."""

    # Model
    model_family: str
    model_flavour: str | None = None
    model_type: str = field(default="lora", metadata=rule(choices=("lora", "full")))
    lora_type: str = field(default="standard", metadata=rule(choices=_choices("lora_type")))
    lycoris_config: Path | None = field(
        default=Path("config/lycoris_config.json"), metadata=rule(path="input_file")
    )
    pretrained_model_name_or_path: str | None = None
    pretrained_vae_model_name_or_path: str | None = None
    revision: str | None = None
    # The frozen base quantised (raytuner/quantize.py); SimpleTuner's other precisions are
    # refused here, before any work starts.
    base_model_precision: str = field(
        default="no_change",
        metadata=rule(
            choices=_choices("base_model_precision"),
            not_yet_supported=tuple(
                name
                for name in _choices("base_model_precision")
                if name not in ("no_change", *QUANTIZED_PRECISIONS)
            ),
        ),
    )
    # cpu: quantise before moving to the device; accelerator: on the device. SimpleTuner's
    # pipeline-level quantisation is refused: raytuner quantises only the transformer it trains.
    quantize_via: str = field(
        default="accelerator",
        metadata=rule(choices=_choices("quantize_via"), not_yet_supported=("pipeline",)),
    )

    # Files and reproducibility
    output_dir: Path = field(default=Path("simpletuner-results"), metadata=rule(path="output"))
    data_backend_config: Path = field(metadata=rule(path="input_file"))
    seed: int | None = field(default=None, metadata=rule(ge=0))

    # Optimisation
    learning_rate: float = field(default=4e-07, metadata=rule(gt=0, example="1e-4"))
    lr_scheduler: str = field(
        default="constant_with_warmup",
        metadata=rule(choices=_choices("lr_scheduler"), value_aliases=value_aliases().get("lr_scheduler")),
    )
    lr_warmup_steps: int = field(default=0, metadata=rule(ge=0))
    lr_num_cycles: int = field(default=1, metadata=rule(ge=1))
    lr_power: float = field(default=0.8, metadata=rule(gt=0))
    optimizer: str = field(
        default="adamw_bf16",
        metadata=rule(
            choices=_choices("optimizer"),
            not_yet_supported=tuple(
                name for name in _choices("optimizer") if name not in RAYTUNER_OPTIMIZERS
            ),
        ),
    )
    adam_beta1: float = field(default=0.9, metadata=rule(ge=0, le=1))
    adam_beta2: float = field(default=0.999, metadata=rule(ge=0, le=1))
    adam_epsilon: float = field(default=1e-08, metadata=rule(gt=0, example="1e-8"))
    adam_weight_decay: float = field(default=1e-02, metadata=rule(ge=0))
    optimizer_beta1: float | None = field(default=None, metadata=rule(ge=0, le=1))
    optimizer_beta2: float | None = field(default=None, metadata=rule(ge=0, le=1))
    optimizer_config: str | None = None
    lr_end: float = field(default=4e-07, metadata=rule(ge=0, example="4e-7"))
    lr_scale: bool = False
    lr_scale_sqrt: bool = False
    # bf16: the frozen base in bfloat16 under autocast, the LoKr weights in float32 (SimpleTuner's
    # meaning); fp16 and fp8 training are not implemented.
    mixed_precision: str = field(
        default="bf16",
        metadata=rule(choices=_choices("mixed_precision"), not_yet_supported=("fp16", "fp8")),
    )
    train_batch_size: int = field(default=4, metadata=rule(ge=1))
    gradient_accumulation_steps: int = field(default=1, metadata=rule(ge=1))
    max_train_steps: int | None = field(default=None, metadata=rule(ge=0, example="10000"))
    num_train_epochs: int = field(default=1, metadata=rule(ge=0))
    gradient_checkpointing: bool = True
    max_grad_norm: float = field(default=2.0, metadata=rule(ge=0))
    grad_clip_method: str = field(default="value", metadata=rule(choices=_choices("grad_clip_method")))
    caption_dropout_probability: float = field(default=0.1, metadata=rule(ge=0, le=1))

    # Flow-matching schedule
    flow_schedule_shift: float = field(default=3.0, metadata=rule(ge=0))
    flow_schedule_auto_shift: bool = False
    flow_sigmoid_scale: float = field(default=1.0, metadata=rule(gt=0))
    flow_use_uniform_schedule: bool = False
    flow_use_beta_schedule: bool = False
    flow_beta_schedule_alpha: float = field(default=2.0, metadata=rule(gt=0))
    flow_beta_schedule_beta: float = field(default=2.0, metadata=rule(gt=0))

    # EMA
    use_ema: bool = False
    ema_decay: float = field(default=0.995, metadata=rule(gt=0, le=1))

    # Checkpoints
    checkpoint_step_interval: int | None = field(default=500, metadata=rule(ge=1))
    checkpoints_total_limit: int | None = field(default=5, metadata=rule(ge=1))
    resume_from_checkpoint: str | None = "latest"

    # Validation and evaluation
    validation_prompt: str | None = None
    validation_negative_prompt: str = "blurry, cropped, ugly"
    validation_resolution: str = "256"
    validation_guidance: float = field(default=7.5, metadata=rule(ge=0))
    validation_guidance_rescale: float = field(default=0.0, metadata=rule(ge=0, le=1))
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
    evaluation_type: str | None = field(default=None, metadata=rule(choices=EVALUATION_TYPES))
    pretrained_evaluation_model_name_or_path: str = DEFAULT_EVALUATION_MODEL

    # Tracking and publishing
    report_to: str = field(default="none", metadata=rule(choices=_choices("report_to")))
    tracker_project_name: str = "simpletuner"
    tracker_run_name: str = "simpletuner-testing"
    # How W&B shows validation images: one image per key ("gallery") or one table per round.
    tracker_image_layout: str = field(default="gallery", metadata=rule(choices=("gallery", "table")))
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
    # Webhooks (raytuner/config/webhooks.py reads them, raytuner/webhooks.py sends): a JSON file,
    # JSON text, or an inline object or list of them. The reporting interval is SimpleTuner's
    # seconds between progress events; unset sends one per step, as SimpleTuner does.
    webhook_config: str | dict[str, Any] | list[Any] | None = None
    webhook_reporting_interval: float | None = field(default=None, metadata=rule(gt=0))

    # Resolution and aspect buckets
    resolution: int | float = field(default=1024, metadata=rule(gt=0))
    resolution_type: str = field(default="pixel_area", metadata=rule(choices=_choices("resolution_type")))
    minimum_image_size: int | float | None = field(default=None, metadata=rule(ge=0))
    aspect_bucket_rounding: int | None = field(default=2, metadata=rule(ge=1, le=9))
    aspect_bucket_alignment: int = field(default=64, metadata=rule(ge=1))
    disable_bucket_pruning: bool = False

    # VAE cache
    vae_batch_size: int = field(default=4, metadata=rule(ge=1))
    vae_cache_ondemand: bool = False

    # Runtime and memory
    disable_benchmark: bool = False
    enable_group_offload: bool = False
    group_offload_type: str = field(
        default="block_level", metadata=rule(choices=("block_level", "leaf_level"))
    )
    group_offload_blocks_per_group: int = field(default=1, metadata=rule(ge=1))
    group_offload_use_stream: bool = False
    group_offload_to_disk_path: Path | None = field(default=None, metadata=rule(path="output"))
    group_offload_text_encoder: bool = False
    group_offload_vae: bool = False
    enable_model_cpu_offload: bool = False
    # A DeepSpeed JSON file, JSON text, an inline object, or a generated one: zero2, zero3,
    # zero2-offload, zero3-offload (raytuner/train/zero.py).
    deepspeed_config: str | dict[str, Any] | None = None
    # accelerate's process count; unset, SimpleTuner (and raytuner) use every GPU found.
    num_processes: int | None = field(default=None, metadata=rule(ge=1))

    # raytuner's own keys: how the run is laid out on Ray (raytuner/train/settings.py).
    ray_num_workers: int | None = field(default=None, metadata=rule(ge=1))
    ray_gpus_per_worker: float | None = field(default=None, metadata=rule(ge=0))
    ray_cpus_per_worker: float | None = field(default=None, metadata=rule(gt=0))
    ray_storage_path: str | None = None
    ray_max_failures: int | None = field(default=None, metadata=rule(ge=-1))
