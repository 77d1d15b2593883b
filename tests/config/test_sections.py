"""config.json in frozen, typed sections: every option in one section under its own name, nothing
changed after loading, and the nested configs (DeepSpeed, webhooks) read once by the loader."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

from raytuner.config import ConfigError, load_config
from raytuner.config.fields import field_names, literal_values, option_fields
from raytuner.config.training import TrainingConfig, replace_options, section_types
from tests.config.helpers import WriteRun


def test_every_option_is_in_exactly_one_section_under_its_own_name() -> None:
    names = Counter(
        option.name
        for section in section_types().values()
        for option in dataclasses.fields(section)
        if not option.metadata.get("derived")
    )
    top = {item.name for item in dataclasses.fields(TrainingConfig) if item.name not in section_types()}
    assert [name for name, count in names.items() if count > 1] == []
    assert set(names) | top == field_names(TrainingConfig)
    assert set(
        TrainingConfig.from_options({"model_family": "omnigen", "data_backend_config": "d"}).flat()
    ) == (field_names(TrainingConfig))


def test_choices_are_literal_types() -> None:
    """A field with a fixed set of values is typed by it, so a checker sees a misspelt value."""
    options = option_fields(TrainingConfig)
    for name in (
        "model_type",
        "lr_scheduler",
        "optimizer",
        "mixed_precision",
        "report_to",
        "resolution_type",
    ):
        _, annotation = options[name]
        assert literal_values(annotation), name


def test_a_loaded_config_cannot_be_changed_and_a_variant_is_a_new_config(write_run: WriteRun) -> None:
    run = load_config(write_run())
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.training.optimization.learning_rate = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.training.output_dir = run.training.output_dir / "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.datasets[0].resolution = 64  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.lycoris.factor = 8  # type: ignore[misc, union-attr]

    variant = replace_options(run.training, {"learning_rate": 3e-4, "max_train_steps": 2, "seed": 1})
    assert (variant.optimization.learning_rate, variant.optimization.max_train_steps, variant.seed) == (
        3e-4,
        2,
        1,
    )
    assert run.training.optimization.max_train_steps == 10 and run.training.seed == 7
    assert variant.model is run.training.model  # sections nobody changed are shared, not copied
    with pytest.raises(KeyError, match="no option 'learning_rte'"):
        replace_options(run.training, {"learning_rte": 1.0})


def test_deepspeed_and_webhook_configs_are_read_once_when_loading(write_run: WriteRun) -> None:
    webhook = {"webhook_type": "raw", "callback_url": "https://example.com/hook", "log_level": "warning"}
    run = load_config(
        write_run(config_updates={"deepspeed_config": "zero3-offload", "webhook_config": [webhook]})
    )
    settings = run.training.memory.deepspeed
    assert settings is not None
    assert (settings.stage, settings.offload_optimizer) == (3, "cpu")
    (target,) = run.training.tracking.webhooks
    assert (target.webhook_type, target.log_level) == ("raw", "warning")
    # The flat view keeps config.json's keys only: what was written, not what was parsed from it.
    assert run.training.flat()["deepspeed_config"] == "zero3-offload"
    assert "deepspeed" not in run.to_dict()["training"]


def test_a_bad_deepspeed_config_is_a_config_error_with_the_others(write_run: WriteRun) -> None:
    bad = {
        "deepspeed_config": {"zero_optimization": {"stage": 1}},
        "max_train_steps": 0,
        "num_train_epochs": 0,
    }
    config = write_run(config_updates=bad)
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert len(caught.value.problems) == 2
    assert any("'zero_optimization.stage' = 1: expected 2 or 3" in line for line in caught.value.problems)
    assert any(
        "'max_train_steps' and 'num_train_epochs' are both 0" in line for line in caught.value.problems
    )
