"""Bad configs the suite checks, as write_run arguments: each must be refused with one clear line.

``BAD_CASES`` are refused by the loader itself; ``PREFLIGHT_CASES`` load, and the pre-flight check
refuses them (what ``raytuner train`` would refuse before Ray starts). ``TRAIN_ONLY`` names the
pre-flight cases that only ``train`` (and ``check-config``, which checks as ``train``) refuses.
"""

from __future__ import annotations

from typing import Any

TWO_TEXT_DEFAULTS = [
    {"id": "images", "type": "local", "instance_data_dir": "images"},
    {"id": "t1", "type": "local", "dataset_type": "text_embeds", "default": True},
    {"id": "t2", "type": "local", "dataset_type": "text_embeds", "default": True},
]

# (case id, write_run keyword arguments, fragments the error line must contain)
BAD_CASES: list[tuple[str, dict[str, Any], list[str]]] = [
    (
        "malformed-json",
        {"config": '{"model_family": "omnigen",\n  "seed": 1,\n}'},
        ["config.json", "invalid JSON at line 3, column 1"],
    ),
    ("config-not-a-dict", {"config": "[1, 2]"}, ["config.json", "expected a JSON object"]),
    (
        "missing-data-backend-file",
        {"config_updates": {"data_backend_config": "config/nowhere.json"}},
        ["'data_backend_config' = 'config/nowhere.json'", "an existing file", "nowhere.json"],
    ),
    (
        "missing-lycoris-file",
        {"config_updates": {"lycoris_config": "no_such_lycoris.json"}},
        ["'lycoris_config'", "no_such_lycoris.json"],
    ),
    (
        "unknown-family",
        {"config_updates": {"model_family": "cosmos2imag"}},
        ["unknown model family", "'cosmos2image'"],
    ),
    (
        "unsupported-simpletuner-family",
        {"config_updates": {"model_family": "flux"}},
        ["model_family 'flux' is not supported by raytuner (supported: cosmos2image, omnigen)"],
    ),
    ("bad-flavour", {"config_updates": {"model_flavour": "7b"}}, ["'model_flavour' = '7b'", "2b, 14b"]),
    (
        "learning-rate-word",
        {"config_updates": {"learning_rate": "fast"}},
        ["'learning_rate' = 'fast': expected a number (e.g. 1e-4)"],
    ),
    (
        "learning-rate-negative",
        {"config_updates": {"learning_rate": -1}},
        ["'learning_rate' = -1: expected a number > 0"],
    ),
    ("batch-size-zero", {"config_updates": {"train_batch_size": "0"}}, ["'train_batch_size' = '0'", ">= 1"]),
    (
        "caption-dropout-above-one",
        {"config_updates": {"caption_dropout_probability": 1.5}},
        ["'caption_dropout_probability' = 1.5", "<= 1"],
    ),
    ("bool-word", {"config_updates": {"use_ema": "maybe"}}, ["'use_ema' = 'maybe': expected true or false"]),
    (
        "bad-lr-scheduler",
        {"config_updates": {"lr_scheduler": "constant_with_warmpu"}},
        [
            "'lr_scheduler' = 'constant_with_warmpu'",
            "cosine_with_restarts",
            "did you mean 'constant_with_warmup'",
        ],
    ),
    (
        "bad-optimizer",
        {"config_updates": {"optimizer": "adamw9000"}},
        ["'optimizer' = 'adamw9000'", "adamw_bf16"],
    ),
    (
        "bad-mixed-precision",
        {"config_updates": {"mixed_precision": "fp64"}},
        ["'mixed_precision' = 'fp64'", "no, fp16, bf16, fp8"],
    ),
    (
        "model-type-full",
        {"config_updates": {"model_type": "full"}},
        ["'model_type' = 'full'", "LoKr adapters only"],
    ),
    (
        "lora-type-standard",
        {"config_updates": {"lora_type": "standard"}},
        ["'lora_type' = 'standard'", 'set "lora_type": "lycoris"'],
    ),
    (
        "lora-type-unset",
        {
            "config": {
                k: v
                for k, v in {
                    "model_family": "omnigen",
                    "data_backend_config": "multidatabackend.json",
                    "max_train_steps": 1,
                }.items()
            }
        },
        ["'lora_type'", "SimpleTuner's default", "lycoris"],
    ),
    (
        "no-steps-no-epochs",
        {"config_updates": {"max_train_steps": 0, "num_train_epochs": 0}},
        ["'max_train_steps' and 'num_train_epochs'"],
    ),
    (
        "two-offloads",
        {"config_updates": {"enable_group_offload": True, "enable_model_cpu_offload": "true"}},
        ["enable_model_cpu_offload"],
    ),
    (
        "bad-lycoris-algo",
        {"lycoris": {"algo": "lokrr", "linear_dim": 4}},
        ["lycoris_config.json", "'algo' = 'lokrr'", "did you mean 'lokr'"],
    ),
    (
        "bad-preset-key",
        {"lycoris": {"algo": "lokr", "apply_preset": {"target_modules": ["Attention"]}}},
        ["apply_preset", "unknown key 'target_modules'", "did you mean 'target_module'"],
    ),
    (
        "lycoris-malformed",
        {"lycoris": '{"algo": "lokr" "factor": 4}'},
        ["lycoris_config.json", "invalid JSON at line 1, column 17"],
    ),
    ("empty-dataset-list", {"datasets": []}, ["multidatabackend.json", "dataset list is empty"]),
    (
        "datasets-not-a-list",
        {"datasets": {"id": "images", "type": "local"}},
        ["multidatabackend.json", "expected a JSON list"],
    ),
    ("dataset-not-an-object", {"datasets": ["images"]}, ["dataset #1", "expected an object"]),
    (
        "duplicate-dataset-ids",
        {
            "datasets": [
                *TWO_TEXT_DEFAULTS[:2],
                {"id": "images", "type": "local", "instance_data_dir": "images"},
            ]
        },
        ["dataset id 'images' is used 2 times"],
    ),
    (
        "two-default-text-embeds",
        {"datasets": TWO_TEXT_DEFAULTS},
        ["'t1', 't2'", "only one text embed dataset"],
    ),
    ("no-image-dataset", {"datasets": [TWO_TEXT_DEFAULTS[1]]}, ["no enabled image dataset"]),
    (
        "bad-caption-strategy",
        {
            "datasets": [
                {
                    "id": "images",
                    "type": "local",
                    "instance_data_dir": "images",
                    "caption_strategy": "filenames",
                }
            ]
        },
        ["dataset 'images': 'caption_strategy' = 'filenames'", "filename, textfile, instanceprompt"],
    ),
    (
        "later-caption-strategy",
        {
            "datasets": [
                {
                    "id": "images",
                    "type": "local",
                    "instance_data_dir": "images",
                    "caption_strategy": "csv",
                }
            ]
        },
        ["'csv' is not supported yet"],
    ),
    (
        "parquet-captions-without-parquet-metadata",
        {
            "datasets": [
                {
                    "id": "images",
                    "type": "local",
                    "instance_data_dir": "images",
                    "caption_strategy": "parquet",
                }
            ]
        },
        ["'caption_strategy' = 'parquet': expected a dataset with \"metadata_backend\": \"parquet\""],
    ),
    (
        "parquet-metadata-without-path",
        {
            "datasets": [
                {
                    "id": "images",
                    "type": "local",
                    "instance_data_dir": "images",
                    "metadata_backend": "parquet",
                    "parquet": {"caption_column": "text"},
                }
            ]
        },
        ["dataset 'images': 'parquet.path' = null: expected the metadata table's file"],
    ),
    (
        "instanceprompt-without-prompt",
        {
            "datasets": [
                {
                    "id": "images",
                    "type": "local",
                    "instance_data_dir": "images",
                    "caption_strategy": "instanceprompt",
                }
            ]
        },
        ["'instance_prompt'", "caption_strategy is instanceprompt"],
    ),
    (
        "bad-crop-style",
        {
            "datasets": [
                {"id": "images", "type": "local", "instance_data_dir": "images", "crop_style": "middle"}
            ]
        },
        ["'crop_style' = 'middle'", "center, centre, random, corner"],
    ),
    *(
        (
            f"later-backend-type-{backend}",
            {"datasets": [{"id": "images", "type": backend, "instance_data_dir": "images"}]},
            [f"dataset 'images': 'type' = '{backend}'", f"'{backend}' is not supported yet", "local, aws"],
        )
        for backend in ("csv", "webshart", "memory")
    ),
    (
        "missing-instance-data-dir-key",
        {"datasets": [{"id": "images", "type": "local"}]},
        ["'instance_data_dir' is required"],
    ),
    (
        "missing-dataset-id",
        {"datasets": [{"type": "local", "instance_data_dir": "images"}]},
        ["dataset #1: 'id' is required"],
    ),
    ("aws-without-bucket", {"datasets": [{"id": "s3", "type": "aws"}]}, ["'aws_bucket_name' is required"]),
]


# Configs that load but that the pre-flight check refuses: what `raytuner train` refuses before Ray
# starts, and `raytuner check-config` with it.
PREFLIGHT_CASES: list[tuple[str, dict[str, Any], list[str]]] = [
    (
        "validation-resolution-typo",
        {"config_updates": {"validation_resolution": "1024by1024", "validation_prompt": "a cat"}},
        ["config.json", "validation_resolution '1024by1024'"],
    ),
    (
        "validation-resolution-typo-without-prompt",
        {"config_updates": {"validation_resolution": "1024by1024"}},
        ["config.json", "validation_resolution '1024by1024'"],
    ),
    (
        "report-to-not-implemented",
        {"config_updates": {"report_to": "comet_ml"}},
        ["config.json", "'report_to' = 'comet_ml'"],
    ),
    (
        "warm-up-longer-than-the-run",
        {
            "config_updates": {
                "lr_scheduler": "polynomial",
                "lr_warmup_steps": 50,
                "learning_rate": 1e-4,
                "lr_end": 1e-6,
                "max_train_steps": 20,
            }
        },
        ["'lr_warmup_steps' = 50 leaves no steps to decay over"],
    ),
    (
        "quantised-base-with-deepspeed",
        {
            "config_updates": {
                "base_model_precision": "int8-quanto",
                "deepspeed_config": {"zero_optimization": {"stage": 2}},
            }
        },
        ["with deepspeed_config: DeepSpeed cannot hold quantised base weights"],
    ),
    (
        "deepspeed-config-unreadable",
        {"config_updates": {"deepspeed_config": "missing-deepspeed.json"}},
        ["deepspeed_config", "no such file"],
    ),
    (
        "bucket-alignment-off-the-token-grid",
        {"config_updates": {"aspect_bucket_alignment": 8}},
        ["'aspect_bucket_alignment' = 8", "expected a multiple of 16"],
    ),
    (
        "skip-file-discovery-word",
        {
            "datasets": [
                {
                    "id": "images",
                    "type": "local",
                    "instance_data_dir": "images",
                    "skip_file_discovery": "vae frames",
                },
                {
                    "id": "text",
                    "type": "local",
                    "dataset_type": "text_embeds",
                    "default": True,
                    "cache_dir": "t",
                },
            ]
        },
        ["'skip_file_discovery' = 'vae frames'", "'frames' is not a phase"],
    ),
    (
        "text-cache-without-a-folder",
        {
            "datasets": [
                {"id": "images", "type": "local", "instance_data_dir": "images"},
                {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True},
            ]
        },
        ["text_embeds dataset 'text': 'cache_dir' is not set"],
    ),
    ("missing-image-folder", {"make_images": False}, ["dataset 'images'", "folder does not exist"]),
    (
        "resume-from-a-missing-checkpoint",
        {"config_updates": {"resume_from_checkpoint": "no/such/checkpoint"}},
        ["'resume_from_checkpoint'", "no/such/checkpoint"],
    ),
    (
        "clip-evaluation-without-a-model",
        {
            "config_updates": {
                "evaluation_type": "clip",
                "pretrained_evaluation_model_name_or_path": "no/such/clip",
            }
        },
        ["'pretrained_evaluation_model_name_or_path'"],
    ),
    (
        "checkpoints-to-the-hub-without-push-to-hub",
        {"config_updates": {"push_checkpoints_to_hub": True}},
        ["push_checkpoints_to_hub", "push_to_hub"],
    ),
    (
        "an-earlier-runs-checkpoints",
        {"config_updates": {"resume_from_checkpoint": None}, "earlier_run": True},
        ["holds checkpoints of an earlier run", "'resume_from_checkpoint' is not 'latest'"],
    ),
]
TRAIN_ONLY = {"checkpoints-to-the-hub-without-push-to-hub", "an-earlier-runs-checkpoints"}
