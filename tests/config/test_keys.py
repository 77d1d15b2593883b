"""How config.json keys are read: `--` prefixes, string values, aliases, unknown and later keys."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from raytuner.config import ConfigError, load_config
from tests.config.helpers import BASE_CONFIG, BASE_LYCORIS


def test_keys_with_leading_dashes_and_string_values(write_run: Any) -> None:
    run = load_config(
        write_run(
            config_updates={
                "--learning_rate": "4e-5",
                "--gradient_checkpointing": "false",
                "validation_num_inference_steps": "20",
                "validation_guidance_rescale": "0.0",
                "train_batch_size": 2.0,
                "--resolution": "512",
            }
        )
    )
    training = run.training
    assert training.optimization.learning_rate == pytest.approx(4e-5) and isinstance(
        training.optimization.learning_rate, float
    )
    assert training.memory.gradient_checkpointing is False
    assert training.validation.validation_num_inference_steps == 20 and isinstance(
        training.validation.validation_num_inference_steps, int
    )
    assert training.validation.validation_guidance_rescale == 0.0
    assert training.optimization.train_batch_size == 2 and isinstance(
        training.optimization.train_batch_size, int
    )
    assert training.data.resolution == 512 and isinstance(training.data.resolution, int)


def test_dataset_and_lycoris_string_values_are_coerced(write_run: Any) -> None:
    datasets = [
        {
            "id": "images",
            "type": "local",
            "instance_data_dir": "images",
            "crop": "true",
            "repeats": "3",
            "resolution": "1.0",
            "resolution_type": "area",
        },
        {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": "true"},
    ]
    run = load_config(
        write_run(datasets=datasets, lycoris={"algo": "LoKr", "factor": "8", "bypass_mode": "true"})
    )
    images = run.datasets[0]
    assert images.crop is True and images.repeats == 3 and images.resolution == 1.0
    assert (
        run.lycoris is not None
        and run.lycoris.algo == "lokr"
        and run.lycoris.factor == 8
        and run.lycoris.bypass_mode
    )


def test_the_same_key_twice_keeps_the_later_one_with_a_warning(write_run: Any) -> None:
    # SimpleTuner passes both to argparse as --seed=..., which keeps the later.
    run = load_config(write_run(config_updates={"--seed": 1}))
    assert run.training.seed == 1
    (warning,) = [w for w in run.warnings if "set twice" in w]
    assert warning.startswith("config.json: 'seed' is set twice (as 'seed' = 7 and '--seed' = 1)")
    assert "using the later one" in warning
    earlier = load_config(write_run(config={"--learning_rate": 2e-4, **BASE_CONFIG, "learning_rate": 1e-4}))
    assert earlier.training.optimization.learning_rate == pytest.approx(1e-4)


def test_simpletuner_aliases_are_mapped_with_a_note(write_run: Any, caplog: pytest.LogCaptureFixture) -> None:
    config_path = write_run(
        config_updates={
            "validation_steps": 250,
            "checkpointing_steps": "300",
            "save_total_limit": 2,
            "vae_cache_preprocess": False,
            "lr_scheduler": "cosine_with_warmup",
            "model_family": "cosmos",
            "__active_tab__": "model",
            "repeats": 5,
        }
    )
    with caplog.at_level(logging.INFO, logger="raytuner.config"):
        run = load_config(config_path)
    training = run.training
    assert training.validation.validation_step_interval == 250
    assert training.checkpoints.checkpoint_step_interval == 300
    assert training.checkpoints.checkpoints_total_limit == 2
    assert training.data.vae_cache_ondemand is True  # vae_cache_preprocess false means on-demand
    assert training.optimization.lr_scheduler == "cosine"
    assert training.model.model_family == "cosmos2image"
    notes = "\n".join(run.notes)
    for name in (
        "validation_steps",
        "checkpointing_steps",
        "save_total_limit",
        "vae_cache_preprocess",
        "__active_tab__",
        "repeats",
    ):
        assert name in notes
    assert not [warning for warning in run.warnings if "unknown key" in warning]
    assert any(
        "validation_steps" in record.getMessage() and record.levelno == logging.INFO
        for record in caplog.records
    )


def test_canonical_key_wins_over_its_alias(write_run: Any) -> None:
    run = load_config(write_run(config_updates={"validation_steps": 10, "validation_step_interval": 20}))
    assert run.training.validation.validation_step_interval == 20
    assert any("'validation_steps' and 'validation_step_interval' are both set" in w for w in run.warnings)


def test_validation_prompt_library_path_is_read_as_user_prompt_library(write_run: Any, tmp_path: Any) -> None:
    (tmp_path / "prompts.json").write_text('{"cat": "a cat"}', encoding="utf-8")
    run = load_config(write_run(config_updates={"validation_prompt_library": "prompts.json"}))
    assert run.training.validation.user_prompt_library == tmp_path / "prompts.json"
    assert run.training.validation.validation_prompt_library is False
    assert run.sources["user_prompt_library"] == tmp_path / "prompts.json"


def test_a_misspelt_key_is_an_error_naming_the_key_meant(write_run: Any) -> None:
    # Read as unknown, it would leave learning_rate at its default (4e-7): a different run.
    config_path = write_run(
        config_updates={"learning-rate": 1e-4, "lerning_rate": 1e-4, "--max_train_step": 5}
    )
    with pytest.raises(ConfigError) as caught:
        load_config(config_path)
    assert caught.value.problems == (
        "config.json: unknown key 'learning-rate' (did you mean 'learning_rate'?); fix the spelling, "
        "or the run would use the default learning_rate",
        "config.json: unknown key 'lerning_rate' (did you mean 'learning_rate'?); fix the spelling, "
        "or the run would use the default learning_rate",
        "config.json: unknown key '--max_train_step' (did you mean 'max_train_steps'?); fix the spelling, "
        "or the run would use the default max_train_steps",
    )


def test_a_misspelt_dataset_or_lycoris_key_is_an_error(write_run: Any) -> None:
    datasets = [
        {"id": "images", "type": "local", "instance_data_dir": "images", "crop_stlye": "center"},
        {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True},
    ]
    with pytest.raises(ConfigError) as caught:
        load_config(write_run(datasets=datasets, lycoris={**BASE_LYCORIS, "factr": 2}))
    problems = "\n".join(caught.value.problems)
    assert (
        "dataset 'images': unknown key 'crop_stlye' (did you mean 'crop_style'?); fix the spelling"
        in problems
    )
    assert "lycoris_config.json: unknown key 'factr' (did you mean 'factor'?); fix the spelling" in problems


def test_an_unknown_key_unlike_any_known_one_warns(write_run: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="raytuner.config"):
        run = load_config(write_run(config_updates={"learning_speed": 1e-4, "team_notes": "x"}))
    assert "config.json: unknown key 'learning_speed' (did you mean 'learning_rate'?)" in run.warnings
    assert "config.json: unknown key 'team_notes'" in run.warnings
    assert any("did you mean 'learning_rate'" in record.getMessage() for record in caplog.records)
    assert run.training.optimization.learning_rate == pytest.approx(4e-7)  # the key did not set anything


def test_simpletuner_key_without_a_field_is_accepted_not_yet_supported(write_run: Any) -> None:
    config_path = write_run(config_updates={"input_perturbation": 0.1, "fused_qkv_projections": True})
    run = load_config(config_path)
    assert any(
        warning.startswith("config.json: accepted, not yet supported: input_perturbation = 0.1 (")
        and warning.endswith("the run will not do what it asks")
        for warning in run.warnings
    )
    assert any("not yet supported: fuse_qkv_projections = true" in warning for warning in run.warnings)
    with pytest.raises(ConfigError) as caught:
        load_config(config_path, strict=True)
    (line,) = [line for line in caught.value.problems if "not yet supported" in line]
    assert "input_perturbation" in line and "fuse_qkv_projections" in line


def test_strict_refuses_unknown_keys_everywhere(write_run: Any) -> None:
    datasets = [
        {
            "id": "images",
            "type": "local",
            "instance_data_dir": "images",
            "owner": "me",
            "probability": 0.5,
        },
        {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True},
    ]
    config_path = write_run(
        config_updates={"team_notes": "x"}, datasets=datasets, lycoris={"algo": "lokr", "comment": "x"}
    )
    run = load_config(config_path)
    assert any("dataset 'images': unknown key 'owner'" in w for w in run.warnings)
    assert any(
        "multidatabackend.json: accepted, not yet supported: probability = 0.5 (in dataset 'images')" in w
        for w in run.warnings
    )
    assert any("lycoris_config.json: unknown key 'comment'" in w for w in run.warnings)
    with pytest.raises(ConfigError) as caught:
        load_config(config_path, strict=True)
    # One line per unknown key, then one line listing every not-yet-supported key of the three files.
    assert len(caught.value.problems) == 4
    assert caught.value.problems[0] == "config.json: unknown key 'team_notes'"
    assert "multidatabackend.json: " in caught.value.problems[3] and "probability" in caught.value.problems[3]


def test_quickstart_only_key_is_a_warning_even_when_strict(write_run: Any) -> None:
    config_path = write_run(
        config_updates={"validation_torch_compile": "false", "post_upload_script": "notify.sh"}
    )
    run = load_config(config_path)
    assert any(
        "ignored, not applicable to raytuner: 'validation_torch_compile'" in warning
        for warning in run.warnings
    )
    with pytest.raises(ConfigError) as caught:  # post_upload_script (not yet supported), not this one
        load_config(config_path, strict=True)
    assert not any("validation_torch_compile" in line for line in caught.value.problems)


def test_dataset_paired_spellings_are_aliases(write_run: Any) -> None:
    datasets = [
        {"id": "images", "type": "local", "instance_data_root": "images", "is_regularization_data": True},
        {"id": "old", "type": "local", "instance_data_dir": "images", "disable": True},
        {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True},
    ]
    run = load_config(write_run(datasets=datasets))
    images, old = run.datasets[0], run.datasets[1]
    assert images.instance_data_dir is not None and images.instance_data_dir.name == "images"
    assert images.is_regularisation_data is True
    assert old.disabled and [d.id for d in run.enabled_datasets] == ["images", "text"]
    assert not [warning for warning in run.warnings if "unknown key" in warning]


def test_datasets_inherit_resolution_from_config(write_run: Any) -> None:
    run = load_config(write_run(config_updates={"resolution": 512, "resolution_type": "pixel"}))
    assert run.datasets[0].resolution == 512 and run.datasets[0].resolution_type == "pixel"


def test_missing_text_embeds_dataset_is_added_as_simpletuner_does(write_run: Any, tmp_path: Any) -> None:
    run = load_config(write_run(datasets=[{"id": "images", "type": "local", "instance_data_dir": "images"}]))
    text = [dataset for dataset in run.datasets if dataset.dataset_type == "text_embeds"]
    assert len(text) == 1 and text[0].default
    assert text[0].cache_dir == str(tmp_path / "output" / "cache" / "text" / "cosmos2image")
    assert any("no text_embeds dataset" in warning for warning in run.warnings)


def test_single_text_embeds_dataset_becomes_the_default(write_run: Any) -> None:
    datasets = [
        {"id": "images", "type": "local", "instance_data_dir": "images"},
        {"id": "text", "type": "local", "dataset_type": "text_embeds"},
    ]
    run = load_config(write_run(datasets=datasets))
    assert run.datasets[1].default


def test_other_lycoris_algos_warn_not_tested(write_run: Any) -> None:
    run = load_config(write_run(lycoris={"algo": "loha", "linear_dim": 8}))
    assert run.lycoris is not None and run.lycoris.algo == "loha"
    assert any("not tested by raytuner" in warning for warning in run.warnings)


def test_lycoris_kwargs_use_lycoris_spelling(write_run: Any) -> None:
    run = load_config(
        write_run(
            lycoris={
                "algo": "lokr",
                "dora_wd": True,
                "factor": 4,
                "apply_preset": {"target_module": ["Attention"]},
            }
        )
    )
    assert run.lycoris is not None and run.lycoris.weight_decompose is True
    kwargs = run.lycoris.create_kwargs()
    assert kwargs["dora_wd"] is True and kwargs["algo"] == "lokr" and "apply_preset" not in kwargs
    assert run.lycoris.apply_preset is not None
    assert run.lycoris.apply_preset.to_dict() == {"target_module": ["Attention"]}


def test_a_shift_set_for_omnigen_is_a_warning(write_run: Any) -> None:
    run = load_config(
        write_run(
            config_updates={
                "model_family": "omnigen",
                "flow_schedule_shift": 3.0,
                "lycoris_config": "lycoris_config.json",
            }
        )
    )
    assert any(
        "flow_schedule_shift set for omnigen" in warning and "applies no shift" in warning
        for warning in run.warnings
    )
    beta = load_config(write_run(config_updates={"model_family": "omnigen", "flow_use_beta_schedule": True}))
    assert any(
        "flow_use_beta_schedule set for omnigen" in warning and "sigmoid(N(0, 1))" in warning
        for warning in beta.warnings
    )
    quiet = load_config(write_run(config_updates={"model_family": "omnigen"}))
    assert not any(
        "applies no shift" in warning for warning in quiet.warnings
    )  # SimpleTuner's default 3.0 is silent


def test_auto_shift_wins_over_a_static_shift_with_a_note(write_run: Any) -> None:
    run = load_config(
        write_run(config_updates={"flow_schedule_shift": 2.0, "flow_schedule_auto_shift": True})
    )
    assert any("flow_schedule_auto_shift is on" in note for note in run.notes)
    assert not any("applies no shift" in warning for warning in run.warnings)


def test_an_unsupported_model_family_is_the_only_line(write_run: Any) -> None:
    # Another family's config fails on its other keys too; the family is what to fix, so it is all
    # that is said.
    config_path = write_run(
        config_updates={
            "model_family": "flux",
            "learning_rate": "fast",
            "lora_type": "standard",
            "flux_lora_target": "all",
            "learning-rate": 1e-4,
        }
    )
    with pytest.raises(ConfigError) as caught:
        load_config(config_path)
    assert caught.value.problems == (
        "config.json: model_family 'flux' is not supported by raytuner (supported: cosmos2image, omnigen)",
    )
    with pytest.raises(ConfigError) as typo:
        load_config(write_run(config_updates={"model_family": "omnigne", "seed": "x"}))
    (unknown,) = typo.value.problems
    assert unknown.startswith(
        "config.json: 'model_family' = 'omnigne': unknown model family (did you mean 'omnigen'?)"
    )
