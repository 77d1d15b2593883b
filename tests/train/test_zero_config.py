"""The DeepSpeed strategy's configuration, checked without Ray or an engine: every way users pass
``deepspeed_config``, what raytuner fills in, and the one-line errors for what it refuses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from raytuner.cli import main
from raytuner.config import ConfigError
from raytuner.config.deepspeed import (
    DeepSpeedConfigError,
    check_deepspeed,
    generated_config,
    read_deepspeed_config,
)
from raytuner.config.training import TrainingConfig
from raytuner.train.deepspeed_plan import DeepSpeedPlan, plan_deepspeed
from raytuner.train.launcher import strategy_summary
from tests.cache.helpers import image_dataset, text_dataset, write_run_files

WHERE = "config.json"


def training(**keys: Any) -> TrainingConfig:
    values: dict[str, Any] = {
        "model_family": "cosmos2image",
        "data_backend_config": Path("unused.json"),
        "train_batch_size": 2,
        "gradient_accumulation_steps": 3,
    }
    return TrainingConfig.from_options({**values, **keys})


def plan(user: dict[str, Any], *, workers: int = 2, **keys: Any) -> DeepSpeedPlan:
    config = training(**keys)
    checked = check_deepspeed(user, mixed_precision=config.model.mixed_precision, where=WHERE)
    return plan_deepspeed(checked, config.optimization, world_size=workers, where=WHERE)


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero2-offload", "zero3-offload"])
def test_generated_configs_fill_the_batch_shape_and_clipping_from_config_json(name: str) -> None:
    result = plan(read_deepspeed_config(name, where=WHERE))
    assert result.stage == (3 if name.startswith("zero3") else 2)
    assert result.offload_optimizer == ("cpu" if name.endswith("offload") else "none")
    config = result.config
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 3
    assert config["train_batch_size"] == 12
    assert config["gradient_clipping"] == 2.0  # SimpleTuner's max_grad_norm default
    assert config["zero_allow_untested_optimizer"] is True
    assert ("zero_force_ds_cpu_optimizer" in config) == name.endswith("offload")


def test_a_file_json_text_and_an_inline_object_read_the_same(tmp_path: Path) -> None:
    body = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    (tmp_path / "ds.json").write_text(json.dumps(body))
    from_file = read_deepspeed_config("ds.json", where=WHERE, base_dir=tmp_path)
    from_text = read_deepspeed_config(json.dumps(body), where=WHERE)
    inline = read_deepspeed_config(body, where=WHERE)
    assert from_file == from_text == inline == body


def test_accelerate_style_auto_values_are_filled() -> None:
    user = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto", "overlap_comm": True},
    }
    result = plan(user, max_grad_norm=0.5)
    assert result.config["train_batch_size"] == 12 and result.config["gradient_clipping"] == 0.5
    assert "reduce_bucket_size" not in result.config["zero_optimization"]
    assert "bf16" not in result.config  # raytuner's own bf16: LoKr weights stay float32


def test_value_clipping_is_said_to_become_norm_clipping() -> None:
    result = plan(generated_config(2), grad_clip_method="value")
    assert any("global norm" in note for note in result.notes)
    unclipped = plan(generated_config(2), optimizer="prodigy")
    assert unclipped.config["gradient_clipping"] == 0.0 and not unclipped.notes


@pytest.mark.parametrize(
    ("user", "keys", "expected"),
    [
        ({"zero_optimization": {"stage": 1}}, {}, "'zero_optimization.stage' = 1: expected 2 or 3"),
        ({"train_batch_size": 8}, {}, "no 'zero_optimization' object"),
        (
            {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}},
            {},
            "has a 'optimizer' section",
        ),
        ({"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}, {}, "'scheduler' section"),
        (
            {"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}},
            {},
            "fp16 training is not supported",
        ),
        (
            {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}},
            {"mixed_precision": "no"},
            "enables bf16 but mixed_precision is 'no'",
        ),
        (
            {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 4},
            {},
            "'train_micro_batch_size_per_gpu' = 4 but config.json and the worker count give 2",
        ),
        (
            {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
            {},
            "'zero_optimization.offload_param' needs stage 3",
        ),
        (
            {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "gpu"}}},
            {},
            "'zero_optimization.offload_optimizer.device' = 'gpu': expected one of none, cpu, nvme",
        ),
        (
            {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}},
            {},
            "device nvme needs 'nvme_path'",
        ),
    ],
)
def test_what_raytuner_refuses_is_one_line_naming_the_key(
    user: dict[str, Any], keys: dict[str, Any], expected: str
) -> None:
    with pytest.raises(DeepSpeedConfigError) as caught:
        plan(user, **keys)
    message = str(caught.value)
    assert expected in message and "\n" not in message and message.startswith(WHERE)


def test_unreadable_values_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(DeepSpeedConfigError, match="no such file"):
        read_deepspeed_config("missing.json", where=WHERE, base_dir=tmp_path)
    with pytest.raises(DeepSpeedConfigError, match="not valid JSON"):
        read_deepspeed_config('{"zero_optimization": ', where=WHERE)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(DeepSpeedConfigError, match="expected a JSON object"):
        read_deepspeed_config(str(tmp_path / "list.json"), where=WHERE)


def test_the_loader_refuses_two_memory_strategies_and_leaf_offload_to_disk(
    tmp_path: Path, tiny_cosmos_dir: Path
) -> None:
    both = write_run_files(
        tmp_path / "both", tiny_cosmos_dir, [], deepspeed_config="zero2", enable_group_offload=True
    )
    with pytest.raises(ConfigError, match="'enable_group_offload' and 'deepspeed_config' are both set"):
        both.load()
    leaf = write_run_files(
        tmp_path / "leaf",
        tiny_cosmos_dir,
        [],
        enable_group_offload=True,
        group_offload_type="leaf_level",
        group_offload_to_disk_path=str(tmp_path / "offload"),
    )
    with pytest.raises(ConfigError, match="leaf_level with 'group_offload_to_disk_path'"):
        leaf.load()
    cpu = write_run_files(
        tmp_path / "cpu", tiny_cosmos_dir, [], enable_group_offload=True, enable_model_cpu_offload=True
    )
    with pytest.raises(
        ConfigError, match="'enable_group_offload' and 'enable_model_cpu_offload' are both true"
    ):
        cpu.load()


def test_an_inline_deepspeed_object_loads_from_config_json(tmp_path: Path, tiny_cosmos_dir: Path) -> None:
    datasets = [
        image_dataset(tmp_path / "images", tmp_path / "cache/vae"),
        text_dataset(tmp_path / "cache/text"),
    ]
    (tmp_path / "images").mkdir()
    files = write_run_files(
        tmp_path, tiny_cosmos_dir, datasets, deepspeed_config={"zero_optimization": {"stage": 3}}
    )
    run = files.load()
    assert run.training.memory.deepspeed_config == {"zero_optimization": {"stage": 3}}


def test_raytuner_train_refuses_a_bad_deepspeed_config_before_ray_starts(
    tmp_path: Path, tiny_cosmos_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:

    (tmp_path / "images").mkdir()
    datasets = [
        image_dataset(tmp_path / "images", tmp_path / "cache/vae"),
        text_dataset(tmp_path / "cache/text"),
    ]
    files = write_run_files(
        tmp_path,
        tiny_cosmos_dir,
        datasets,
        deepspeed_config={"zero_optimization": {"stage": 2}, "optimizer": {}},
    )
    assert main(["train", "--config", str(files.config)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert any("has a 'optimizer' section" in line for line in lines), err
    assert not (tmp_path / "output").exists()  # nothing was started or written


def test_the_start_line_names_the_strategy() -> None:
    assert strategy_summary(training().memory, None) == "data parallel"
    assert "group-offloaded (block_level)" in strategy_summary(
        training(enable_group_offload=True).memory, None
    )
    zero3 = plan(generated_config(3, offload_optimizer=True))
    assert (
        strategy_summary(training().memory, zero3)
        == "DeepSpeed ZeRO stage 3, optimizer state offloaded to cpu"
    )
