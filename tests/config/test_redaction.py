"""Credentials never appear in printed output, serialized config, repr or error messages."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from raytuner.config import (
    REDACTED,
    ConfigError,
    DatasetConfig,
    LycorisConfig,
    PresetConfig,
    TrainingConfig,
    is_secret_key,
    load_config,
    redact,
)
from raytuner.train.preflight import check_config_main

HF_TOKEN = "hf_abcdefSECRET123"
AWS_SECRET = "aws-secret-SECRET456"
AWS_KEY_ID = "AKIASECRET789"
AWS_SESSION = "session-SECRET000"
SECRETS = (HF_TOKEN, AWS_SECRET, AWS_KEY_ID, AWS_SESSION)


@pytest.mark.parametrize(
    "name",
    [
        "hf_token",
        "--hf_token",
        "aws_secret_access_key",
        "aws_session_token",
        "aws_access_key_id",
        "wandb_api_key",
        "apikey",
        "db_password",
        "client-secret",
        "auth_token",
        "private_key",
    ],
)
def test_secret_names(name: str) -> None:
    assert is_secret_key(name)


@pytest.mark.parametrize(
    "name",
    [
        "tokenizer_max_length",
        "aspect_bucket_rounding",
        "aspect_bucket_alignment",
        "hub_model_id",
        "max_tokens",
        "key",
        "sort_key",
        "keep_vae_loaded",
        "text_encoder_limit",
        "num_train_epochs",
    ],
)
def test_not_secret_names(name: str) -> None:
    assert not is_secret_key(name)


def test_every_secret_field_is_hidden_from_repr() -> None:
    for cls in (TrainingConfig, DatasetConfig, LycorisConfig, PresetConfig):
        for field in dataclasses.fields(cls):
            if is_secret_key(field.name):
                assert field.repr is False, f"{cls.__name__}.{field.name} would show in repr"


def test_redact_helper_walks_nested_values() -> None:
    value = {
        "a": [{"aws_secret_access_key": "x", "id": "d"}],
        "hf_token": "y",
        "hub_model_id": "me/model",
        "api_key": None,
    }
    assert redact(value) == {
        "a": [{"aws_secret_access_key": REDACTED, "id": "d"}],
        "hf_token": REDACTED,
        "hub_model_id": "me/model",
        "api_key": None,
    }


@pytest.fixture
def secret_run(write_run: Any) -> Any:
    datasets = [
        {
            "id": "s3-images",
            "type": "aws",
            "aws_bucket_name": "bucket",
            "aws_access_key_id": AWS_KEY_ID,
            "aws_secret_access_key": AWS_SECRET,
            "aws_session_token": AWS_SESSION,
        },
        {
            "id": "text",
            "type": "local",
            "dataset_type": "text_embeds",
            "default": True,
            "cache_dir": "cache/text",
        },
    ]
    return write_run(config_updates={"hf_token": HF_TOKEN, "hub_model_id": "me/lokr"}, datasets=datasets)


def test_secrets_are_redacted_in_to_dict_and_repr(secret_run: Any) -> None:
    run = load_config(secret_run)
    assert run.training.tracking.hf_token == HF_TOKEN and run.datasets[0].aws_secret_access_key == AWS_SECRET
    serialized = json.dumps(run.to_dict())
    printed = repr(run)
    for secret in SECRETS:
        assert secret not in serialized
        assert secret not in printed
    assert run.to_dict()["training"]["hf_token"] == REDACTED
    assert run.to_dict()["training"]["hub_model_id"] == "me/lokr"
    assert run.to_dict(redact=False)["datasets"][0]["aws_secret_access_key"] == AWS_SECRET


def test_secrets_are_redacted_in_check_config_output(
    secret_run: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert check_config_main(str(secret_run)) == 0
    captured = capsys.readouterr()
    for secret in SECRETS:
        assert secret not in captured.out + captured.err
    assert f'"hf_token": "{REDACTED}"' in captured.out


def test_secrets_are_redacted_in_error_messages(write_run: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write_run(config_updates={"hf_token": ["hf_listSECRET"]}))
    assert "hf_listSECRET" not in " ".join(caught.value.problems)
    assert "'hf_token' = '***'" in caught.value.problems[0]
