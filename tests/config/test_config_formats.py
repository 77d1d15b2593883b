"""config.toml and config.env are read as SimpleTuner reads them, into the same typed config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from raytuner.config import ConfigError, load_config
from raytuner.config.formats import options_as_object
from raytuner.outputs import write_config_copies

TOML = """
model_family = "cosmos2image"
model_type = "lora"
lora_type = "lycoris"
lycoris_config = "lycoris_config.json"
data_backend_config = "multidatabackend.json"
output_dir = "output"
"--max_train_steps" = 10
seed = 7
learning_rate = 1e-4
gradient_checkpointing = false
validation_step_interval = 0
"""

ENV = """
# SimpleTuner's config.env: shell assignments, each variable an option
export MODEL_FAMILY=cosmos2image
export MODEL_TYPE='lora'
export LORA_TYPE="lycoris"
export LYCORIS_CONFIG=lycoris_config.json
export DATALOADER_CONFIG=multidatabackend.json
export OUTPUT_DIR=output
export MAX_NUM_STEPS=10
export TRAINING_SEED=7
export LEARNING_RATE=1e-4
export USE_GRADIENT_CHECKPOINTING=false
export VALIDATION_STEPS=50
export VALIDATION_STEP_INTERVAL=25
export TRAINING_NUM_PROCESSES=1
export CONFIG_TYPE=env
export SIMPLETUNER_LOG_LEVEL=DEBUG
export TRAINER_EXTRA_ARGS="--lr_warmup_steps=3 --lr_scheduler cosine"
export TRAINER_EXTRA_ARGS+=" --use_ema"
"""


def _write(write_run: Any, name: str, text: str) -> Path:
    config_json = write_run()
    path = config_json.parent / name
    path.write_text(text, encoding="utf-8")
    config_json.unlink()  # the run reads the file named, never a config.json beside it
    return path


def test_a_toml_config_is_read_like_the_json_one(write_run: Any) -> None:
    run = load_config(_write(write_run, "config.toml", TOML))
    training = run.training
    assert training.model.model_family == "cosmos2image" and training.seed == 7
    assert training.optimization.max_train_steps == 10
    assert training.optimization.learning_rate == pytest.approx(1e-4)
    assert training.memory.gradient_checkpointing is False
    assert training.validation.validation_step_interval == 0
    assert run.sources["config"].name == "config.toml"


def test_a_toml_table_is_an_unknown_key_and_bad_toml_one_line(write_run: Any) -> None:
    run = load_config(_write(write_run, "config.toml", TOML + '\n[team]\nnotes = "x"\n'))
    assert "config.toml: unknown key 'team'" in run.warnings
    with pytest.raises(ConfigError) as caught:
        load_config(_write(write_run, "config.toml", TOML + "learning_rate =\n"))
    (line,) = caught.value.problems
    assert line.startswith("config.toml: invalid TOML: ") and "line 13" in line


def test_a_config_env_maps_simpletuners_variables_to_options(write_run: Any) -> None:
    run = load_config(_write(write_run, "config.env", ENV))
    training = run.training
    assert training.model.model_family == "cosmos2image" and training.model.lora_type == "lycoris"
    assert training.seed == 7 and training.optimization.max_train_steps == 10
    assert training.optimization.learning_rate == pytest.approx(1e-4)
    # "false" passes nothing, so the option keeps SimpleTuner's default (on, for this one).
    assert training.memory.gradient_checkpointing is True
    assert any(
        "USE_GRADIENT_CHECKPOINTING=false passes nothing, as in SimpleTuner: gradient_checkpointing keeps its default"
        in note
        for note in run.notes
    )
    # Two variables of one option: the later in SimpleTuner's list wins, with a warning.
    assert training.validation.validation_step_interval == 25
    assert any("'validation_step_interval' is set twice" in warning for warning in run.warnings)
    # TRAINER_EXTRA_ARGS: --key=value, --key value and a bare switch, += appending words.
    assert training.optimization.lr_warmup_steps == 3
    assert training.optimization.lr_scheduler == "cosine"
    assert options_as_object(run.sources["config"])["--use_ema"] is True
    assert not [warning for warning in run.warnings if "unknown" in warning]


def test_a_config_env_option_set_true_is_the_switch_and_false_the_default(write_run: Any) -> None:
    on = load_config(_write(write_run, "config.env", ENV + "export USE_GRADIENT_CHECKPOINTING=true\n"))
    assert on.training.memory.gradient_checkpointing is True
    assert options_as_object(on.sources["config"])["--gradient_checkpointing"] is True
    assert "--gradient_checkpointing" not in options_as_object(
        _write(
            write_run,
            "config.env",
            ENV.replace("USE_GRADIENT_CHECKPOINTING=false", "USE_GRADIENT_CHECKPOINTING=False"),
        )
    )


def test_a_misspelt_config_env_variable_is_an_error(write_run: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(_write(write_run, "config.env", ENV + "export LEARNIG_RATE=1e-3\nexport MY_TEAM=x\n"))
    assert caught.value.problems == (
        "config.env: 'LEARNIG_RATE' is no variable SimpleTuner reads (did you mean 'LEARNING_RATE'?); "
        "fix its name, or the option keeps its default",
    )


def test_config_env_of_an_environment_is_read_over_the_base_one(write_run: Any, tmp_path: Path) -> None:
    write_run()
    (tmp_path / "config" / "pets").mkdir(parents=True)
    (tmp_path / "config" / "config.env").write_text(ENV, encoding="utf-8")
    env_file = tmp_path / "config" / "pets" / "config.env"
    env_file.write_text(
        "export LEARNING_RATE=3e-4\nexport DATALOADER_CONFIG=multidatabackend.json\n", encoding="utf-8"
    )
    run = load_config(env_file)
    assert run.training.optimization.learning_rate == pytest.approx(3e-4)
    assert run.training.seed == 7  # from config/config.env
    assert any("read over config/config.env" in note for note in run.notes)


def test_the_run_keeps_a_config_json_copy_of_a_toml_or_env_config(write_run: Any, tmp_path: Path) -> None:
    for name, text in (("config.toml", TOML), ("config.env", ENV)):
        run = load_config(_write(write_run, name, text))
        (copy, *_rest) = write_config_copies(run, tmp_path / name.replace(".", "-"))
        written = json.loads(copy.read_text(encoding="utf-8"))
        assert copy.name == "config.json" and written == options_as_object(run.sources["config"]), name
        assert written.get("model_family", written.get("--model_family")) == "cosmos2image", name
