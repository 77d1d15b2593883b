"""raytuner's config fields against SimpleTuner's lists: names, defaults and choices agree."""

from __future__ import annotations

import dataclasses

from raytuner.config import DatasetConfig, TrainingConfig
from raytuner.config.fields import field_names, field_rule, option_fields
from raytuner.config.surface import config_keys, dataset_keys, option_specs

# Fields raytuner has that SimpleTuner's option registry does not list (the seeds' docs use them).
RAYTUNER_ONLY_FIELDS = {"hf_token", "enable_model_cpu_offload"}


def test_training_fields_are_simpletuner_option_names() -> None:
    # raytuner's own keys carry the ray_ prefix, so they can never shadow a SimpleTuner option.
    names = {name for name in field_names(TrainingConfig) if not name.startswith("ray_")}
    assert names - config_keys() == RAYTUNER_ONLY_FIELDS


def test_dataset_fields_are_simpletuner_dataset_keys() -> None:
    # Derived fields (a huggingface block's caption columns) are read by the parser, not by name.
    names = {field.name for field in dataclasses.fields(DatasetConfig) if not field.metadata.get("derived")}
    assert names <= dataset_keys()


def test_defaults_match_simpletuner() -> None:
    """Every option whose default SimpleTuner's list gives is a field with that default (a key left
    out behaves as in SimpleTuner); where raytuner acts differently, the compatibility table says why."""
    defaults = {name: field.default for name, (field, _) in option_fields(TrainingConfig).items()}
    assert sorted(set(option_specs()) - set(defaults)) == []
    for name, spec in option_specs().items():
        if defaults[name] is dataclasses.MISSING:
            continue
        listed = spec.default.split(" [")[0].strip("'")
        ours = defaults[name]
        if listed == "None":
            assert ours is None, name
        elif name == "lycoris_config" or name == "output_dir":
            assert str(ours) == listed, name
        elif spec.type == "bool":
            assert ours == (listed == "True"), name
        elif spec.type in ("int", "float"):
            assert ours == float(listed), name
        else:
            assert ours == listed, name


def test_choices_come_from_simpletuner() -> None:
    fields = option_fields(TrainingConfig)
    for name in (
        "lr_scheduler",
        "optimizer",
        "mixed_precision",
        "base_model_precision",
        "report_to",
        "quantize_via",
    ):
        assert field_rule(*fields[name])["choices"] == option_specs()[name].choices
