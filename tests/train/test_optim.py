"""config.json's optimiser and learning-rate keys, each shown changing what raytuner builds (CPU, plain torch)."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import optimi
import prodigyopt
import pytest
import torch

from raytuner.config import TrainingConfig, load_config
from raytuner.config.training import RAYTUNER_OPTIMIZERS
from raytuner.train.optim import (
    SUPPORTED_LR_SCHEDULERS,
    SUPPORTED_OPTIMIZERS,
    OptimizerError,
    build_lr_scheduler,
    build_optimizer,
    effective_learning_rate,
    optimizer_settings,
    parse_optimizer_config,
)

# SimpleTuner passes foreach=True to optimi, which optimi 0.3 answers with this DeprecationWarning.
OPTIMI_FOREACH = "ignore:Parameter `foreach` is deprecated:DeprecationWarning"
HAS_BITSANDBYTES = importlib.util.find_spec("bitsandbytes") is not None
CAN_RUN_BITSANDBYTES = HAS_BITSANDBYTES and torch.cuda.is_available()


def training(**options: Any) -> TrainingConfig:
    return TrainingConfig.from_options(
        {"model_family": "cosmos2image", "data_backend_config": Path("unused.json"), **options}
    )


def tiny_model() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def group(config: TrainingConfig, *, world_size: int = 1) -> dict[str, Any]:
    """The settings the optimiser built from ``config`` runs with."""
    return build_optimizer(
        tiny_model().parameters(), config.optimization, world_size=world_size
    ).param_groups[0]


def lr_curve(config: TrainingConfig, *, total_steps: int, at: list[int]) -> list[float]:
    """The learning rate each of the optimiser steps in ``at`` runs with."""
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], config.optimization)
    scheduler = build_lr_scheduler(optimizer, config.optimization, total_steps=total_steps)
    seen = []
    for _ in range(max(at) + 1):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return [seen[step] for step in at]


# --- optimizer -------------------------------------------------------------------------------

EXPECTED_CLASSES = {
    "adamw_bf16": torch.optim.AdamW,
    "torch-adam": torch.optim.Adam,
    "torch-adamw": torch.optim.AdamW,
    "torch-sgd": torch.optim.SGD,
    "torch-radam": torch.optim.RAdam,
    "torch-nadam": torch.optim.NAdam,
    "torch-rmsprop": torch.optim.RMSprop,
    "torch-adagrad": torch.optim.Adagrad,
    "torch-adadelta": torch.optim.Adadelta,
    "torch-adafactor": torch.optim.Adafactor,
    "torch-adamax": torch.optim.Adamax,
    "torch-asgd": torch.optim.ASGD,
    "optimi-stableadamw": optimi.StableAdamW,
    "optimi-adamw": optimi.AdamW,
    "optimi-lion": optimi.Lion,
    "optimi-radam": optimi.RAdam,
    "optimi-ranger": optimi.Ranger,
    "optimi-adan": optimi.Adan,
    "optimi-adam": optimi.Adam,
    "optimi-sgd": optimi.SGD,
    "prodigy": prodigyopt.Prodigy,
}
# Built only where bitsandbytes imports and a CUDA GPU is present; class names in bitsandbytes.optim.
BITSANDBYTES_CLASSES = {"bnb-adamw8bit": "AdamW8bit", "bnb-lion8bit-paged": "PagedLion8bit"}


def test_supported_names_are_the_torch_optimizers_and_simpletuners_schedules() -> None:
    assert set(SUPPORTED_OPTIMIZERS) == set(EXPECTED_CLASSES) | set(BITSANDBYTES_CLASSES)
    assert set(SUPPORTED_OPTIMIZERS) == set(RAYTUNER_OPTIMIZERS)
    assert set(SUPPORTED_LR_SCHEDULERS) == {
        "linear",
        "sine",
        "cosine",
        "cosine_with_restarts",
        "polynomial",
        "constant",
        "constant_with_warmup",
    }


@pytest.mark.filterwarnings(OPTIMI_FOREACH)
@pytest.mark.parametrize("name", EXPECTED_CLASSES)
def test_optimizer_picks_its_class_and_takes_a_step(name: str) -> None:
    model = tiny_model()
    before = model.weight.detach().clone()
    optimizer = build_optimizer(model.parameters(), training(optimizer=name, learning_rate=1e-2).optimization)
    assert type(optimizer) is EXPECTED_CLASSES[name]
    model(torch.ones(4, 3)).square().sum().backward()
    optimizer.step()
    assert not torch.equal(model.weight.detach(), before)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("torch-adam", {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False}),
        ("torch-adamw", {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2, "amsgrad": False}),
        ("torch-sgd", {"momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False}),
        ("torch-radam", {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}),
        ("torch-nadam", {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "momentum_decay": 4e-3}),
        ("torch-rmsprop", {"alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0}),
        ("torch-adagrad", {"lr_decay": 0.0, "eps": 1e-10, "weight_decay": 0.0}),
        ("torch-adadelta", {"rho": 0.9, "eps": 1e-6, "weight_decay": 0.0}),
        ("torch-adafactor", {"beta2_decay": -0.8, "eps": (None, 1e-3), "d": 1.0, "weight_decay": 0.0}),
        ("torch-adamax", {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}),
        ("torch-asgd", {"lambd": 1e-4, "alpha": 0.75, "t0": 1e6, "weight_decay": 0.0}),
        (
            "optimi-stableadamw",
            {"beta1": 0.9, "beta2": 0.99, "weight_decay": 1e-2, "eps": 1e-6, "decouple_lr": False}
            | {"max_lr": None, "kahan_sum": True, "foreach": True},
        ),
        (
            "optimi-adamw",
            {"beta1": 0.9, "beta2": 0.99, "eps": 1e-6, "weight_decay": 0.0, "decouple_lr": False}
            | {"kahan_sum": True, "max_lr": None},
        ),
        (
            "optimi-lion",
            {"beta1": 0.9, "beta2": 0.99, "weight_decay": 0.0, "decouple_lr": False, "max_lr": None}
            | {"kahan_sum": True, "foreach": True},
        ),
        (
            "optimi-radam",
            {"beta1": 0.9, "beta2": 0.99, "weight_decay": 0.0, "eps": 1e-6, "decouple_wd": True}
            | {"decouple_lr": False, "kahan_sum": True, "foreach": True},
        ),
        (
            "optimi-ranger",
            {"beta1": 0.9, "beta2": 0.99, "weight_decay": 0.0, "eps": 1e-6, "k": 6, "alpha": 0.5}
            | {"decouple_wd": True, "decouple_lr": False, "max_lr": None, "kahan_sum": True, "foreach": True},
        ),
        (
            "optimi-adan",
            {"beta1": 0.98, "beta2": 0.92, "beta3": 0.999, "weight_decay": 2e-2, "eps": 1e-6}
            | {"decouple_lr": False, "max_lr": None, "adam_wd": False, "kahan_sum": True, "foreach": True},
        ),
        (
            "optimi-adam",
            {"beta1": 0.9, "beta2": 0.99, "eps": 1e-6, "weight_decay": 0.0, "decouple_wd": False}
            | {"decouple_lr": False, "kahan_sum": True, "max_lr": None},
        ),
        (
            "optimi-sgd",
            {"momentum": 0, "weight_decay": 0.0, "dampening": False, "decouple_wd": False}
            | {"decouple_lr": False, "max_lr": None, "torch_init": False, "kahan_sum": True, "foreach": True},
        ),
        (
            "prodigy",
            {"lr": 1.0, "betas": (0.9, 0.99), "beta3": None, "weight_decay": 0.0}
            | {"use_bias_correction": False, "d0": 1e-6, "d_coef": 1, "eps": 1e-8},
        ),
    ],
)
@pytest.mark.filterwarnings(OPTIMI_FOREACH)
def test_optimizer_starts_from_simpletuners_defaults(name: str, expected: dict[str, Any]) -> None:
    # optimi keeps betas as beta1, beta2 (and Adan's beta3) in its parameter groups.
    settings = group(training(optimizer=name))
    assert {key: settings[key] for key in expected} == expected


@pytest.mark.parametrize("name", SUPPORTED_OPTIMIZERS)
def test_optimizer_defaults_are_all_settings_its_class_takes(name: str) -> None:
    # A default the class does not take would be dropped with a warning on every run.
    config = training(optimizer=name, learning_rate=1.0)
    try:
        settings = optimizer_settings(config.optimization)
    except OptimizerError:
        assert name in BITSANDBYTES_CLASSES and not CAN_RUN_BITSANDBYTES
        return
    assert settings.ignored == ()


@pytest.mark.filterwarnings(OPTIMI_FOREACH)
@pytest.mark.parametrize(
    ("name", "optimizer_config", "expected"),
    [
        ("optimi-lion", "weight_decay=0.1,kahan_sum=false,foreach=false", {"weight_decay": 0.1}),
        ("optimi-adamw", "eps=1e-8,decouple_lr=true", {"eps": 1e-8, "decouple_lr": True, "max_lr": 1e-3}),
        ("optimi-adan", "adam_wd=true", {"adam_wd": True, "weight_decay": 2e-2}),
        ("prodigy", "d_coef=0.5,use_bias_correction=true,lr=0.5", {"d_coef": 0.5, "lr": 0.5}),
        ("prodigy", "weight_decay=0.01,d0=1e-5", {"weight_decay": 0.01, "d0": 1e-5, "d": 1e-5}),
    ],
)
def test_optimizer_config_reaches_the_optimi_and_prodigy_optimizers(
    name: str, optimizer_config: str, expected: dict[str, Any]
) -> None:
    config = training(optimizer=name, learning_rate=1e-3, optimizer_config=optimizer_config)
    model = tiny_model()
    before = model.weight.detach().clone()
    optimizer = build_optimizer(model.parameters(), config.optimization)
    settings = optimizer.param_groups[0]
    assert {key: settings[key] for key in expected} == expected
    for key, value in parse_optimizer_config(optimizer_config).items():
        assert settings[key] == value
    model(torch.ones(4, 3)).square().sum().backward()
    optimizer.step()
    assert not torch.equal(model.weight.detach(), before)


def test_prodigy_runs_at_lr_1_over_learning_rate_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    # SimpleTuner's settings for prodigy carry lr=1.0, which replaces learning_rate.
    with caplog.at_level(logging.WARNING, logger="raytuner.train.optim"):
        assert group(training(optimizer="prodigy", learning_rate=1e-4))["lr"] == 1.0
    assert "'optimizer' = 'prodigy' runs at lr 1, not 'learning_rate' (0.0001)" in caplog.text
    assert "set 'optimizer_config' to 'lr=...'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="raytuner.train.optim"):
        assert group(training(optimizer="prodigy", learning_rate=1.0))["lr"] == 1.0
        assert group(training(optimizer="prodigy", optimizer_config="lr=0.3"))["lr"] == 0.3
    assert caplog.text == ""


def test_prodigy_adapts_its_step_size() -> None:
    model = tiny_model()
    optimizer = build_optimizer(model.parameters(), training(optimizer="prodigy").optimization)
    for _ in range(20):
        optimizer.zero_grad()
        model(torch.ones(4, 3)).square().sum().backward()
        optimizer.step()
    assert optimizer.param_groups[0]["d"] > 1e-6


# --- bitsandbytes: CUDA only -------------------------------------------------------------------------


@pytest.mark.skipif(CAN_RUN_BITSANDBYTES, reason="this machine has bitsandbytes and a CUDA GPU")
@pytest.mark.parametrize("name", BITSANDBYTES_CLASSES)
def test_bitsandbytes_optimizer_without_cuda_or_package_names_what_is_missing(name: str) -> None:
    with pytest.raises(OptimizerError) as raised:
        optimizer_settings(training(optimizer=name).optimization)
    message = str(raised.value)
    assert message.startswith(f"'optimizer' = {name!r} needs bitsandbytes and a CUDA GPU; missing here: ")
    missing = message.split("; missing here: ")[1]
    assert ("bitsandbytes (pip install 'raytuner[bnb]')" in missing) == (not HAS_BITSANDBYTES)
    assert ("a CUDA GPU" in missing) == (not torch.cuda.is_available())
    assert re.search(
        r"; use an optimizer that runs here instead, e\.g\. '(adamw_bf16|optimi-lion)'$", message
    )
    assert "\n" not in message
    with pytest.raises(OptimizerError, match="^" + re.escape(message) + "$"):
        build_optimizer(tiny_model().parameters(), training(optimizer=name).optimization)


@pytest.mark.skipif(CAN_RUN_BITSANDBYTES, reason="this machine has bitsandbytes and a CUDA GPU")
def test_config_naming_a_bitsandbytes_optimizer_loads_and_is_refused_before_work(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    datasets = [
        {"id": "images", "type": "local", "instance_data_dir": "images", "caption_strategy": "filename"},
        {"id": "text", "type": "local", "dataset_type": "text_embeds", "default": True, "cache_dir": "text"},
    ]
    files = {
        "config.json": {
            "model_family": "cosmos2image",
            "model_type": "lora",
            "lora_type": "lycoris",
            "lycoris_config": str(tmp_path / "lycoris_config.json"),
            "data_backend_config": str(tmp_path / "multidatabackend.json"),
            "output_dir": str(tmp_path / "output"),
            "optimizer": "bnb-lion8bit-paged",
        },
        "multidatabackend.json": datasets,
        "lycoris_config.json": {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "factor": 4},
    }
    for file_name, body in files.items():
        (tmp_path / file_name).write_text(json.dumps(body))
    run = load_config(tmp_path / "config.json")
    assert run.training.optimization.optimizer == "bnb-lion8bit-paged"
    with pytest.raises(OptimizerError, match=r"^'optimizer' = 'bnb-lion8bit-paged' needs bitsandbytes"):
        optimizer_settings(run.training.optimization)


@pytest.mark.gpu
@pytest.mark.parametrize("name", BITSANDBYTES_CLASSES)
def test_bitsandbytes_optimizer_builds_and_steps_on_cuda(name: str) -> None:
    bitsandbytes_optim = pytest.importorskip("bitsandbytes.optim")
    torch.manual_seed(0)
    # 8192 weights: over SimpleTuner's min_8bit_size of 4096, so the state is kept in 8 bits.
    model = torch.nn.Linear(64, 128).cuda()
    before = model.weight.detach().clone()
    optimizer = build_optimizer(model.parameters(), training(optimizer=name, learning_rate=1e-3).optimization)
    assert type(optimizer) is getattr(bitsandbytes_optim, BITSANDBYTES_CLASSES[name])
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.ones(4, 64, device="cuda")).square().sum().backward()
        optimizer.step()
    torch.cuda.synchronize()
    assert not torch.equal(model.weight.detach(), before)
    assert torch.isfinite(model.weight).all()
    assert optimizer.state[model.weight]["state1"].dtype == torch.uint8


def test_adamw_bf16_runs_adamw_with_adamw_bf16_defaults_on_float32_weights() -> None:
    model = tiny_model()
    optimizer = build_optimizer(
        model.parameters(), training(optimizer="adamw_bf16", learning_rate=1e-3).optimization
    )
    settings = optimizer.param_groups[0]
    assert type(optimizer) is torch.optim.AdamW
    assert (settings["eps"], settings["weight_decay"], settings["betas"]) == (1e-6, 1e-2, (0.9, 0.999))
    assert model.weight.dtype == torch.float32
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    assert torch.isfinite(model.weight).all()


@pytest.mark.parametrize(
    ("name", "verdict"),
    [
        ("bnb-adam8bit", "not supported by raytuner yet"),
        ("bnb-lion8bit", "not supported by raytuner yet"),
        ("soap", "not supported by raytuner yet"),
        ("adamw_schedulefree", "not supported by raytuner yet"),
        ("torch-sparseadam", "not supported by raytuner yet"),
        ("adamw9000", "unknown"),
    ],
)
def test_optimizer_raytuner_cannot_run_is_refused_by_name(name: str, verdict: str) -> None:
    with pytest.raises(OptimizerError) as raised:
        build_optimizer(tiny_model().parameters(), training(optimizer=name).optimization)
    message = str(raised.value)
    assert message.startswith(f"'optimizer' = {name!r}: {verdict}; use one of: adamw_bf16, torch-adam,")
    assert "\n" not in message


# --- learning rate and its scaling ---------------------------------------------------------------


def test_learning_rate_sets_optimizer_lr() -> None:
    assert group(training(optimizer="torch-adamw", learning_rate=3e-4))["lr"] == 3e-4
    assert group(training(optimizer="torch-adamw", learning_rate=1e-5))["lr"] == 1e-5


def test_lr_scale_multiplies_by_batch_accumulation_and_workers() -> None:
    config = training(learning_rate=1e-4, train_batch_size=4, gradient_accumulation_steps=2, lr_scale=True)
    assert effective_learning_rate(config.optimization, world_size=3) == pytest.approx(1e-4 * 24)
    assert group(config, world_size=3)["lr"] == pytest.approx(1e-4 * 24)
    assert group(training(learning_rate=1e-4, train_batch_size=4), world_size=3)["lr"] == 1e-4


def test_lr_scale_sqrt_takes_the_square_root_with_lr_scale_and_does_nothing_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    options = {"learning_rate": 1e-4, "train_batch_size": 4, "gradient_accumulation_steps": 2}
    both = training(**options, lr_scale=True, lr_scale_sqrt=True)
    assert group(both, world_size=2)["lr"] == pytest.approx(1e-4 * math.sqrt(16))
    with caplog.at_level(logging.WARNING, logger="raytuner.train.optim"):
        assert group(training(**options, lr_scale_sqrt=True), world_size=2)["lr"] == 1e-4
    assert "'lr_scale_sqrt' does nothing without 'lr_scale'" in caplog.text


# --- betas, epsilon, weight decay ------------------------------------------------------------------


def test_optimizer_beta1_and_beta2_set_betas() -> None:
    config = training(optimizer="adamw_bf16", optimizer_beta1=0.8, optimizer_beta2=0.95)
    assert group(config)["betas"] == (0.8, 0.95)
    assert group(training(optimizer="adamw_bf16"))["betas"] == (0.9, 0.999)


@pytest.mark.parametrize("given", [{"optimizer_beta1": 0.8}, {"optimizer_beta2": 0.95}])
def test_optimizer_beta_alone_is_refused(given: dict[str, float]) -> None:
    with pytest.raises(OptimizerError, match="'optimizer_beta1' and 'optimizer_beta2' go together"):
        group(training(**given))


@pytest.mark.parametrize(
    ("option", "value", "setting"),
    [
        ("adam_beta1", 0.5, "betas"),
        ("adam_beta2", 0.5, "betas"),
        ("adam_epsilon", 1e-3, "eps"),
        ("adam_weight_decay", 0.5, "weight_decay"),
    ],
)
def test_adam_options_leave_the_optimizer_as_simpletuner_does(
    option: str, value: float, setting: str
) -> None:
    # SimpleTuner hands adam_* only to a DeepSpeed-owned optimiser; its own optimisers ignore them.
    # The config loader warns (tests/config/test_compatibility.py).
    changed = group(training(optimizer="torch-adamw", **{option: value}))
    assert changed[setting] == group(training(optimizer="torch-adamw"))[setting]


# --- optimizer_config --------------------------------------------------------------------------------


def test_optimizer_config_overrides_the_optimizer_defaults() -> None:
    config = training(optimizer="torch-adamw", optimizer_config="eps=1e-6,weight_decay=0.0,amsgrad=true")
    settings = group(config)
    assert (settings["eps"], settings["weight_decay"], settings["amsgrad"]) == (1e-6, 0.0, True)
    # Explicit betas win over the optimiser's defaults and are applied after optimizer_config.
    both = training(
        optimizer="torch-adamw", optimizer_config="eps=1e-7", optimizer_beta1=0.7, optimizer_beta2=0.9
    )
    assert (group(both)["eps"], group(both)["betas"]) == (1e-7, (0.7, 0.9))


def test_optimizer_config_values_are_read_as_simpletuner_reads_them() -> None:
    parsed = parse_optimizer_config("a=0.5,b=3,c=true,d=False,e=none,f=1e-6,g=-0.8,h=word,")
    assert parsed == {"a": 0.5, "b": 3, "c": True, "d": False, "e": None, "f": 1e-6, "g": -0.8, "h": "word"}
    assert type(parsed["b"]) is int
    assert parse_optimizer_config(None) == {} == parse_optimizer_config("")


@pytest.mark.parametrize("entry", ["eps", "=1e-6", "eps=", "eps=1e-6=2"])
def test_optimizer_config_bad_entry_names_it_and_the_form(entry: str) -> None:
    with pytest.raises(OptimizerError) as raised:
        group(training(optimizer_config=f"weight_decay=0.0,{entry}"))
    assert str(raised.value).startswith(f"'optimizer_config' entry {entry!r}: expected key=value; write ")
    assert "eps=1e-6,weight_decay=0.0" in str(raised.value)


def test_optimizer_config_keys_the_optimizer_does_not_take_are_dropped_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # adamw_bf16's class takes lr, betas, eps and weight_decay only; SimpleTuner's UI suggests beta1=.
    with caplog.at_level(logging.WARNING, logger="raytuner.train.optim"):
        settings = group(training(optimizer="adamw_bf16", optimizer_config="amsgrad=true,beta1=0.5"))
    assert settings["amsgrad"] is False
    assert "'optimizer' = 'adamw_bf16' takes no amsgrad, beta1" in caplog.text


def test_optimizer_config_value_the_optimizer_refuses_is_one_line() -> None:
    with pytest.raises(OptimizerError) as raised:
        group(training(optimizer="torch-adamw", optimizer_config="eps=-1"))
    message = str(raised.value)
    assert message.startswith("'optimizer' = 'torch-adamw': AdamW refused its settings")
    assert message.endswith("Invalid epsilon value: -1") and "\n" not in message


# --- lr_scheduler and its knobs ----------------------------------------------------------------------

LR = 0.1


@pytest.mark.parametrize(
    ("scheduler", "options", "at", "expected"),
    [
        ("constant", {}, [0, 5, 9], [LR, LR, LR]),
        ("constant_with_warmup", {"lr_warmup_steps": 4}, [0, 1, 2, 4, 8], [0, 0.025, 0.05, LR, LR]),
        # warm-up to 0.1 over 2 steps, then straight down to 0 at step 10
        ("linear", {"lr_warmup_steps": 2}, [0, 1, 2, 6, 10], [0, 0.05, LR, 0.05, 0]),
        # SimpleTuner's wave: 0.01 + 0.09 * (1 + cos(pi * step / 4)) / 2
        ("cosine", {"lr_warmup_steps": 4, "lr_end": 0.01}, [0, 2, 4, 6, 8], [LR, 0.055, 0.01, 0.055, LR]),
        # SimpleTuner's wave: 0.01 + 0.09 * (1 + sin(pi * step / 4)) / 2
        ("sine", {"lr_warmup_steps": 4, "lr_end": 0.01}, [0, 2, 4, 6, 8], [0.055, LR, 0.055, 0.01, 0.055]),
        # warm-up over 2 steps, then 2 cosine cycles of 4 steps each, each restarting at 0.1
        (
            "cosine_with_restarts",
            {"lr_warmup_steps": 2, "lr_num_cycles": 2},
            [1, 2, 4, 6, 8, 10],
            [0.05, LR, 0.05, LR, 0.05, 0],
        ),
        # after warm-up: 0.09 * (1 - (step - 2) / 8) ** 2 + 0.01, then lr_end
        (
            "polynomial",
            {"lr_warmup_steps": 2, "lr_end": 0.01, "lr_power": 2.0},
            [0, 1, 2, 6, 10, 12],
            [0, 0.05, LR, 0.0325, 0.01, 0.01],
        ),
    ],
)
def test_lr_scheduler_curve_matches_hand_computed_values(
    scheduler: str, options: dict[str, Any], at: list[int], expected: list[float]
) -> None:
    config = training(optimizer="torch-sgd", learning_rate=LR, lr_scheduler=scheduler, **options)
    assert lr_curve(config, total_steps=10, at=at) == pytest.approx(expected, abs=1e-12)


def test_lr_warmup_steps_sets_the_warmup_length() -> None:
    def at_step_2(warmup: int) -> float:
        config = training(learning_rate=LR, lr_scheduler="constant_with_warmup", lr_warmup_steps=warmup)
        return lr_curve(config, total_steps=10, at=[2])[0]

    assert at_step_2(2) == pytest.approx(LR)
    assert at_step_2(8) == pytest.approx(LR * 2 / 8)


def test_constant_with_lr_warmup_steps_warms_up_as_simpletuner_does() -> None:
    config = training(learning_rate=LR, lr_scheduler="constant", lr_warmup_steps=4)
    assert lr_curve(config, total_steps=10, at=[0, 2, 4]) == pytest.approx([0, 0.05, LR])


def test_lr_num_cycles_sets_the_number_of_restarts() -> None:
    def at_step_6(cycles: int) -> float:
        config = training(
            learning_rate=LR, lr_scheduler="cosine_with_restarts", lr_warmup_steps=2, lr_num_cycles=cycles
        )
        return lr_curve(config, total_steps=10, at=[6])[0]

    assert at_step_6(1) == pytest.approx(0.05)  # halfway down the only cycle
    assert at_step_6(2) == pytest.approx(LR)  # the second cycle has just restarted


def test_lr_power_shapes_the_polynomial_decay() -> None:
    def at_step_6(power: float) -> float:
        config = training(
            learning_rate=LR, lr_scheduler="polynomial", lr_warmup_steps=2, lr_end=0.01, lr_power=power
        )
        return lr_curve(config, total_steps=10, at=[6])[0]

    assert at_step_6(1.0) == pytest.approx(0.09 * 0.5 + 0.01)
    assert at_step_6(2.0) == pytest.approx(0.09 * 0.25 + 0.01)


@pytest.mark.parametrize(("scheduler", "lowest_step"), [("polynomial", 10), ("cosine", 4), ("sine", 6)])
@pytest.mark.parametrize("lr_end", [0.01, 0.02])
def test_lr_end_is_where_the_schedule_bottoms_out(scheduler: str, lowest_step: int, lr_end: float) -> None:
    config = training(learning_rate=LR, lr_scheduler=scheduler, lr_warmup_steps=4, lr_end=lr_end)
    assert lr_curve(config, total_steps=10, at=[lowest_step]) == pytest.approx([lr_end])


def test_scheduler_starts_from_the_scaled_learning_rate() -> None:
    config = training(learning_rate=LR, lr_scheduler="constant", train_batch_size=2, lr_scale=True)
    assert lr_curve(config, total_steps=4, at=[0, 3]) == pytest.approx([2 * LR, 2 * LR])


def test_cosine_without_warmup_uses_simpletuners_1000_step_half_period(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = training(learning_rate=LR, lr_scheduler="cosine", lr_end=0.0)
    with caplog.at_level(logging.WARNING, logger="raytuner.train.optim"):
        assert lr_curve(config, total_steps=10, at=[0])[0] == pytest.approx(LR)
        optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], config.optimization)
        scheduler = build_lr_scheduler(optimizer, config.optimization, total_steps=2000)
        for _ in range(500):
            optimizer.step()
            scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(LR / 2)
    assert "half-period of 1000 steps" in caplog.text


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"lr_scheduler": "sine", "lr_warmup_steps": 0},
            "'lr_scheduler' = 'sine' needs 'lr_warmup_steps' > 0",
        ),
        ({"lr_scheduler": "polynomial", "lr_end": 0.5}, "'lr_end' = 0.5 must be below the learning rate 0.1"),
        ({"lr_scheduler": "polynomial", "lr_warmup_steps": 10}, "'lr_warmup_steps' = 10 leaves no steps"),
    ],
)
def test_schedule_that_cannot_run_is_refused_in_one_line(options: dict[str, Any], message: str) -> None:
    config = training(learning_rate=LR, **options)
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], config.optimization)
    with pytest.raises(OptimizerError, match=f"^{re.escape(message)}"):
        build_lr_scheduler(optimizer, config.optimization, total_steps=10)
