"""Bad configs: each gives one clear, self-contained error line and exit status 2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from raytuner.config import ConfigError, load_config
from raytuner.config.check import check_config_main

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
                    "caption_strategy": "parquet",
                }
            ]
        },
        ["'parquet' is not supported yet"],
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
        for backend in ("csv", "huggingface", "webshart", "memory")
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


@pytest.mark.parametrize(("case", "files", "fragments"), BAD_CASES, ids=[case[0] for case in BAD_CASES])
def test_bad_config_gives_one_clear_line(
    case: str, files: dict[str, Any], fragments: list[str], write_run: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = write_run(**files)
    with pytest.raises(ConfigError) as caught:
        load_config(config_path)
    error = caught.value
    assert isinstance(error, ValueError)
    assert "\n" not in str(error)
    matching = [line for line in error.problems if all(fragment in line for fragment in fragments)]
    assert matching, f"no problem line contains {fragments}: {error.problems}"
    assert all("\n" not in line for line in error.problems)

    assert check_config_main(str(config_path)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert any(
        line.startswith("error: ") and all(f in line for f in fragments) for line in captured.err.splitlines()
    )


def test_missing_config_file_differs_from_malformed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"nope\.json: file not found"):
        load_config("nope.json")
    assert check_config_main("nope.json") == 2
    (tmp_path / "broken.json").write_text("{", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"broken\.json: invalid JSON at line 1, column 2"):
        load_config("broken.json")


def test_missing_instance_data_dir_folder_fails_preflight(
    write_run: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = write_run(make_images=False)
    load_config(config_path)  # loading does not require the folder; the pre-flight check does
    assert check_config_main(str(config_path)) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "dataset 'images'" in err and "images': folder does not exist" in err


def test_several_problems_are_reported_together(write_run: Any) -> None:
    config_path = write_run(
        config_updates={"learning_rate": "fast", "train_batch_size": 0, "use_ema": "perhaps"}
    )
    with pytest.raises(ConfigError) as caught:
        load_config(config_path)
    assert len(caught.value.problems) == 3
    assert str(caught.value).endswith("(and 2 more problems)")
    # The other files are checked too once config.json itself is usable.
    config_path = write_run(lycoris={"algo": "nope"}, datasets=[])
    with pytest.raises(ConfigError) as caught:
        load_config(config_path)
    assert {line.split(":")[0] for line in caught.value.problems} == {
        "multidatabackend.json",
        "lycoris_config.json",
    }
