"""Reading SimpleTuner's three config file formats into option pairs.

SimpleTuner turns every format into command-line arguments (``--key=value``) before argparse
reads them, so a key set twice is read once, the later value winning. Each reader here returns
the file's ``(key as written, value)`` pairs in that order and leaves the rest (aliases, field
rules, duplicates) to the loader, which treats every format alike:

* ``config.json``: a JSON object; values keep their JSON types.
* ``config.toml``: a TOML document; its top-level keys are options, as in SimpleTuner.
* ``config.env``: shell assignments (``export NAME=value``, ``NAME+=more``), read as
  SimpleTuner's env backend reads them: each variable of its fixed list (``LEARNING_RATE`` ->
  ``--learning_rate``, ``ENV_TO_OPTION``) in that list's order, then the words of
  ``TRAINER_EXTRA_ARGS``. ``true`` is the switch, ``false`` leaves the option at its default.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from raytuner.config.errors import ConfigError
from raytuner.config.paths import display
from raytuner.config.surface import near_miss

ConfigFormat = Literal["json", "toml", "env"]
# The file each format is read from when SimpleTuner looks for it, in its search order.
FORMAT_FILES: dict[ConfigFormat, str] = {"json": "config.json", "toml": "config.toml", "env": "config.env"}

# SimpleTuner's env backend: the variables it reads, in its order (a later one of the same
# option wins, as argparse keeps the last). A value after "=" is what the switch sets.
ENV_TO_OPTION: dict[str, str] = {
    "RESUME_CHECKPOINT": "resume_from_checkpoint",
    "DATALOADER_CONFIG": "data_backend_config",
    "ASPECT_BUCKET_ROUNDING": "aspect_bucket_rounding",
    "TRAINING_SEED": "seed",
    "ACCELERATE_CONFIG_PATH": "accelerate_config",
    "ACCELERATE_EXTRA_ARGS": "accelerate_extra_args",
    "USE_EMA": "use_ema",
    "USE_XFORMERS": "enable_xformers_memory_efficient_attention",
    "MINIMUM_RESOLUTION": "minimum_image_size",
    "OUTPUT_DIR": "output_dir",
    "USE_DORA": "use_dora",
    "USE_BITFIT": "layer_freeze_strategy=bitfit",
    "LORA_TYPE": "lora_type",
    "LYCORIS_CONFIG": "lycoris_config",
    "PUSH_TO_HUB": "push_to_hub",
    "PUSH_TO_HUB_BACKGROUND": "push_to_hub_background",
    "PUSH_CHECKPOINTS": "push_checkpoints_to_hub",
    "PUBLISHING_CONFIG": "publishing_config",
    "MAX_NUM_STEPS": "max_train_steps",
    "NUM_EPOCHS": "num_train_epochs",
    "CHECKPOINTING_STEPS": "checkpoint_step_interval",
    "CHECKPOINT_STEP_INTERVAL": "checkpoint_step_interval",
    "CHECKPOINT_EPOCH_INTERVAL": "checkpoint_epoch_interval",
    "CHECKPOINTING_LIMIT": "checkpoints_total_limit",
    "HUB_MODEL_NAME": "hub_model_id",
    "MODEL_CARD_SAFE_FOR_WORK": "model_card_safe_for_work",
    "TRACKER_PROJECT_NAME": "tracker_project_name",
    "TRACKER_RUN_NAME": "tracker_run_name",
    "MODEL_TYPE": "model_type",
    "MODEL_NAME": "pretrained_model_name_or_path",
    "MODEL_FAMILY": "model_family",
    "QWEN_TEXT_ENCODER_MODEL_NAME_OR_PATH": "qwen_text_encoder_model_name_or_path",
    "TRAIN_BATCH_SIZE": "train_batch_size",
    "USE_GRADIENT_CHECKPOINTING": "gradient_checkpointing",
    "GRADIENT_CHECKPOINTING_OFFLOAD_ATTENTION": "gradient_checkpointing_offload_attention",
    "GRADIENT_CHECKPOINTING_OFFLOAD_PREFETCH": "gradient_checkpointing_offload_prefetch",
    "GRADIENT_CHECKPOINTING_OFFLOAD_PIN_MEMORY_MAX_BUCKETS": "gradient_checkpointing_offload_pin_memory_max_buckets",
    "GRADIENT_CHECKPOINTING_SEGMENT_STRIDE": "gradient_checkpointing_segment_stride",
    "ENABLE_CHUNKED_FEED_FORWARD": "enable_chunked_feed_forward",
    "FEED_FORWARD_CHUNK_SIZE": "feed_forward_chunk_size",
    "CAPTION_DROPOUT_PROBABILITY": "caption_dropout_probability",
    "RESOLUTION_TYPE": "resolution_type",
    "RESOLUTION": "resolution",
    "VALIDATION_SEED": "validation_seed",
    "VALIDATION_STEPS": "validation_step_interval",
    "VALIDATION_STEP_INTERVAL": "validation_step_interval",
    "VALIDATION_EPOCH_INTERVAL": "validation_epoch_interval",
    "VALIDATE_AFTER_STEP": "validate_after_step",
    "VALIDATE_AFTER_EPOCH": "validate_after_epoch",
    "VALIDATION_RESOLUTION": "validation_resolution",
    "VALIDATION_GUIDANCE": "validation_guidance",
    "VALIDATION_METHOD": "validation_method",
    "VALIDATION_EXTERNAL_SCRIPT": "validation_external_script",
    "VALIDATION_EXTERNAL_BACKGROUND": "validation_external_background",
    "DEEPFLOYD_VALIDATION_PIPELINE_MODE": "deepfloyd_validation_pipeline_mode",
    "DEEPFLOYD_VALIDATION_STAGE1_MODEL": "deepfloyd_validation_stage1_model",
    "DEEPFLOYD_VALIDATION_STAGE2_MODEL": "deepfloyd_validation_stage2_model",
    "DEEPFLOYD_VALIDATION_STAGE3_MODE": "deepfloyd_validation_stage3_mode",
    "DEEPFLOYD_VALIDATION_STAGE3_MODEL": "deepfloyd_validation_stage3_model",
    "DEEPFLOYD_VALIDATION_STAGE1_NUM_INFERENCE_STEPS": "deepfloyd_validation_stage1_num_inference_steps",
    "DEEPFLOYD_VALIDATION_STAGE2_NUM_INFERENCE_STEPS": "deepfloyd_validation_stage2_num_inference_steps",
    "DEEPFLOYD_VALIDATION_STAGE1_GUIDANCE": "deepfloyd_validation_stage1_guidance",
    "DEEPFLOYD_VALIDATION_STAGE2_GUIDANCE": "deepfloyd_validation_stage2_guidance",
    "DEEPFLOYD_VALIDATION_STAGE3_GUIDANCE": "deepfloyd_validation_stage3_guidance",
    "DEEPFLOYD_VALIDATION_STAGE3_NOISE_LEVEL": "deepfloyd_validation_stage3_noise_level",
    "WAN_VALIDATION_LOAD_OTHER_STAGE": "wan_validation_load_other_stage",
    "SDXL_VALIDATION_PIPELINE_MODE": "sdxl_validation_pipeline_mode",
    "SDXL_VALIDATION_STAGE1_MODEL": "sdxl_validation_stage1_model",
    "SDXL_VALIDATION_STAGE2_MODEL": "sdxl_validation_stage2_model",
    "PIXART_VALIDATION_PIPELINE_MODE": "pixart_validation_pipeline_mode",
    "PIXART_VALIDATION_STAGE1_MODEL": "pixart_validation_stage1_model",
    "PIXART_VALIDATION_STAGE2_MODEL": "pixart_validation_stage2_model",
    "LTX2_VALIDATION_PIPELINE_MODE": "ltx2_validation_pipeline_mode",
    "LTX2_VALIDATION_SPATIAL_UPSAMPLER_MODEL": "ltx2_validation_spatial_upsampler_model",
    "LTX2_VALIDATION_SPATIAL_UPSAMPLER_FILENAME": "ltx2_validation_spatial_upsampler_filename",
    "LTX2_VALIDATION_AUDIO_GUIDANCE": "ltx2_validation_audio_guidance",
    "POST_CHECKPOINT_SCRIPT": "post_checkpoint_script",
    "POST_UPLOAD_SCRIPT": "post_upload_script",
    "VALIDATION_GUIDANCE_RESCALE": "validation_guidance_rescale",
    "VALIDATION_NUM_INFERENCE_STEPS": "validation_num_inference_steps",
    "VALIDATION_PROMPT": "validation_prompt",
    "VALIDATION_INPUT": "validation_input",
    "ALLOW_TF32": "allow_tf32",
    "MIXED_PRECISION": "mixed_precision",
    "OPTIMIZER": "optimizer",
    "LEARNING_RATE": "learning_rate",
    "LR_SCHEDULE": "lr_scheduler",
    "LR_WARMUP_STEPS": "lr_warmup_steps",
    "BASE_MODEL_PRECISION": "base_model_precision",
    "QUANTIZE_VIA": "quantize_via",
    "QUANTIZATION_CONFIG": "quantization_config",
    "SDNQ_WEIGHTS_DTYPE": "sdnq_weights_dtype",
    "SDNQ_QUANTIZED_MATMUL_DTYPE": "sdnq_quantized_matmul_dtype",
    "SDNQ_GROUP_SIZE": "sdnq_group_size",
    "SDNQ_USE_QUANTIZED_MATMUL": "sdnq_use_quantized_matmul",
    "SDNQ_COMPILE_MODE": "sdnq_compile_mode",
    "SDNQ_USE_STATIC_QUANTIZATION": "sdnq_use_static_quantization",
    "SDNQ_USE_STOCHASTIC_ROUNDING": "sdnq_use_stochastic_rounding",
    "SDNQ_DEQUANTIZE_FP32": "sdnq_dequantize_fp32",
    "SDNQ_USE_SVD": "sdnq_use_svd",
    "SDNQ_SVD_RANK": "sdnq_svd_rank",
    "SDNQ_SVD_STEPS": "sdnq_svd_steps",
    "SDNQ_USE_HADAMARD": "sdnq_use_hadamard",
    "SDNQ_HADAMARD_GROUP_SIZE": "sdnq_hadamard_group_size",
    "SDNQ_MODULES_TO_NOT_CONVERT": "sdnq_modules_to_not_convert",
    "SDNQ_MODULES_TO_NOT_USE_MATMUL": "sdnq_modules_to_not_use_matmul",
    "SDNQ_MODULES_DTYPE_DICT": "sdnq_modules_dtype_dict",
    "SDNQ_MODULES_QUANT_CONFIG": "sdnq_modules_quant_config",
    "TRAINING_NUM_PROCESSES": "num_processes",
    "TRAINING_NUM_MACHINES": "num_machines",
    "VALIDATION_GUIDANCE_REAL": "validation_guidance_real",
    "VALIDATION_NO_CFG_UNTIL_TIMESTEP": "validation_no_cfg_until_timestep",
    "TRAINING_SCHEDULER_TIMESTEP_SPACING": "training_scheduler_timestep_spacing",
    "INFERENCE_SCHEDULER_TIMESTEP_SPACING": "inference_scheduler_timestep_spacing",
    "GRADIENT_ACCUMULATION_STEPS": "gradient_accumulation_steps",
    "LR_END": "lr_end",
    "FLUX_GUIDANCE_VALUE": "flux_guidance_value",
    "FLUX_LORA_TARGET": "flux_lora_target",
    "VALIDATION_NEGATIVE_PROMPT": "validation_negative_prompt",
    "METADATA_UPDATE_INTERVAL": "metadata_update_interval",
    "READ_BATCH_SIZE": "read_batch_size",
    "WRITE_BATCH_SIZE": "write_batch_size",
    "TEXT_ENCODER_BATCH_SIZE": "text_encoder_batch_size",
    "TEXT_CACHE_ONDEMAND": "text_cache_ondemand",
    "TEXT_CACHE_DISABLE": "text_cache_disable",
    "AWS_MAX_POOL_CONNECTIONS": "aws_max_pool_connections",
    "TORCH_NUM_THREADS": "torch_num_threads",
    "IMAGE_PROCESSING_BATCH_SIZE": "image_processing_batch_size",
    "DISABLE_BENCHMARK": "disable_benchmark",
}
EXTRA_ARGS_VARIABLE = "TRAINER_EXTRA_ARGS"
# Variables a config.env sets for SimpleTuner's launcher and environment, not options: read
# without comment (the dynamo backend is an accelerate launch setting SimpleTuner leaves out).
ENVIRONMENT_ONLY = frozenset(
    {
        "CONFIG_BACKEND",
        "CONFIG_TYPE",
        "CONFIG_PATH",
        "SIMPLETUNER_CONFIG_BACKEND",
        "ENV",
        "SIMPLETUNER_ENV",
        "SIMPLETUNER_ENVIRONMENT",
        "SIMPLETUNER_LOG_LEVEL",
        "TRAINER_DYNAMO_BACKEND",
        "TRAINING_DYNAMO_BACKEND",
    }
)


@dataclass
class ConfigOptions:
    """One config file's options as ``(key as written, value)`` pairs, in the order read."""

    pairs: list[tuple[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def config_format(path: Path) -> ConfigFormat:
    """The format of a config file, by its suffix (``.toml``, ``.env``; anything else is JSON)."""
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return "toml"
    if suffix == ".env":
        return "env"
    return "json"


def read_text(path: Path, kind: str) -> str:
    """The file's text; a missing file, a folder and bad encoding are each one clear error."""
    shown = display(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{shown}: file not found (working directory: {Path.cwd()})") from None
    except IsADirectoryError:
        raise ConfigError(f"{shown}: is a folder, expected a {kind} file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{shown}: not UTF-8 text; save it as UTF-8 {kind}") from None


def read_json(path: Path) -> Any:
    """The decoded file; a missing file and malformed JSON are different errors."""
    text = read_text(path, "JSON")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"{display(path)}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}; "
            "fix the syntax there (a trailing comma or a missing quote is the usual cause)"
        ) from None


def read_options(path: Path) -> ConfigOptions:
    """The options of a config.json, config.toml or config.env, by the file's suffix."""
    kind = config_format(path)
    if kind == "toml":
        return _toml_options(path)
    if kind == "env":
        return _env_options(path)
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise ConfigError(
            f'{display(path)}: expected a JSON object of options ({{"model_family": ...}}), got a list or value'
        )
    return ConfigOptions(pairs=list(raw.items()))


def options_as_object(path: Path) -> dict[str, Any]:
    """A config file's options as one JSON-ready object (a later key replacing an earlier one),
    e.g. to write a config.json derived from a file in any format."""
    values: dict[str, Any] = {}
    for written, value in read_options(path).pairs:
        values.pop(written.removeprefix("--"), None)
        values.pop(f"--{written.removeprefix('--')}", None)
        values[written] = value
    return values


def _toml_options(path: Path) -> ConfigOptions:
    try:
        raw = tomllib.loads(read_text(path, "TOML"))
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{display(path)}: invalid TOML: {error}; fix the syntax there") from None
    return ConfigOptions(pairs=list(raw.items()))


def parse_env_file(text: str, *, where: str, into: dict[str, list[str]], warnings: list[str]) -> None:
    """Add a config.env's assignments to ``into`` (each variable's words), as SimpleTuner reads
    them: ``export`` is dropped, one pair of surrounding quotes is removed, ``+=`` appends words.
    No shell runs: ``$VAR`` and ``${VAR}`` stay as written."""
    for number, raw_line in enumerate(text.splitlines(), 1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ")
        if "+=" in line:
            name, value = line.split("+=", 1)
            into.setdefault(name.strip(), []).extend(value.strip('"').strip("'").split())
        elif "=" in line:
            name, value = line.split("=", 1)
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            into[name.strip()] = value.split()
        else:
            warnings.append(
                f"{where}: line {number} is not an assignment (NAME=value); skipped, as SimpleTuner skips it"
            )


def env_layers(path: Path) -> list[Path]:
    """The config.env files read for ``path``: SimpleTuner sources config/config.env first and
    then config/<env>/config.env over it, so a file in such a folder is read over its base."""
    base = path.parent.parent / FORMAT_FILES["env"]
    if path.name == FORMAT_FILES["env"] and path.parent.parent.name == "config" and base.is_file():
        return [base, path]
    return [path]


def _env_options(path: Path) -> ConfigOptions:
    options = ConfigOptions()
    where = display(path)
    variables: dict[str, list[str]] = {}
    layers = env_layers(path)
    for layer in layers:
        parse_env_file(
            read_text(layer, "config.env"), where=display(layer), into=variables, warnings=options.warnings
        )
    if len(layers) > 1:
        options.notes.append(f"{where}: read over {display(layers[0])}, as SimpleTuner sources both")
    # SimpleTuner exports only non-empty values, and reads its variables back in its own order.
    values = {name: " ".join(words) for name, words in variables.items() if words}
    for name, target in ENV_TO_OPTION.items():
        if name in values:
            value = _unquote(values[name])
            if value.lower() == "false":
                # SimpleTuner passes nothing for it, so a switch that defaults on stays on.
                options.notes.append(
                    f"{where}: {name}=false passes nothing, as in SimpleTuner: "
                    f"{target.partition('=')[0]} keeps its default"
                )
                continue
            _add_env_option(target, value, options)
    extra = values.get(EXTRA_ARGS_VARIABLE, "")
    options.pairs.extend(_extra_args(extra, where=where, warnings=options.warnings))
    for name in values:
        if name in ENV_TO_OPTION or name == EXTRA_ARGS_VARIABLE or name in ENVIRONMENT_ONLY:
            continue
        near = near_miss(name, [*ENV_TO_OPTION, EXTRA_ARGS_VARIABLE])
        if near is not None:
            options.problems.append(
                f"{where}: '{name}' is no variable SimpleTuner reads (did you mean '{near}'?); "
                "fix its name, or the option keeps its default"
            )
        else:
            options.notes.append(
                f"{where}: '{name}' is not an option variable; ignored, as SimpleTuner ignores it"
            )
    return options


def _unquote(value: str) -> str:
    for quote in "'\"":
        if len(value) >= 2 and value[0] == value[-1] == quote:
            value = value[1:-1]
    return value


def _add_env_option(target: str, value: str, options: ConfigOptions) -> None:
    key, _, fixed = target.partition("=")
    written = f"--{key}"
    if value.lower() == "true":
        options.pairs.append((written, fixed or True))
    else:
        options.pairs.append((written, f"{fixed}={value}" if fixed else value))


def _extra_args(text: str, *, where: str, warnings: list[str]) -> list[tuple[str, Any]]:
    """TRAINER_EXTRA_ARGS as options: ``--key=value``, ``--key value`` and the switch ``--key``."""
    pairs: list[tuple[str, Any]] = []
    words = text.split()
    index = 0
    while index < len(words):
        word = words[index]
        index += 1
        if "${" in word or word.startswith("$"):
            warnings.append(
                f"{where}: {EXTRA_ARGS_VARIABLE}: '{word}' is a shell expansion; skipped (no shell runs)"
            )
            continue
        if not word.startswith("-"):
            warnings.append(f"{where}: {EXTRA_ARGS_VARIABLE}: '{word}' follows no option; skipped")
            continue
        key, equals, value = word.partition("=")
        written = f"--{key.lstrip('-')}"
        if equals:
            pairs.append((written, value))
        elif index < len(words) and not words[index].startswith("-"):
            pairs.append((written, words[index]))
            index += 1
        else:
            pairs.append((written, True))
    return pairs
