"""attention_mechanism: diffusers' attention backends on the training transformer, the rest refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

from raytuner.config import ConfigError, load_config
from raytuner.config.training import ATTENTION_MECHANISMS, AttentionMechanism
from raytuner.data.synthetic import synthetic_images, to_pixels
from raytuner.models.base import ATTENTION_BACKENDS, AttentionBackendError
from raytuner.train.model import build_model


@pytest.fixture
def restore_attention() -> Any:
    """diffusers keeps the active attention backend per process: put back what the test changed."""
    active, _ = _AttentionBackendRegistry.get_active_backend()
    yield
    _AttentionBackendRegistry.set_active_backend(active)


def test_every_mechanism_raytuner_runs_is_a_diffusers_backend() -> None:
    runs = set(get_args(AttentionMechanism))
    assert runs <= set(ATTENTION_MECHANISMS)
    assert runs - {"diffusers"} == set(ATTENTION_BACKENDS)
    assert {AttentionBackendName(name) for name in ATTENTION_BACKENDS.values()}


def test_simpletuners_own_kernels_are_refused_by_name(write_run: Any) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(write_run(config_updates={"attention_mechanism": "sageattention"}))
    (line,) = raised.value.problems
    assert "'attention_mechanism' = 'sageattention'" in line
    assert "'sageattention' is not supported yet; use one of: diffusers, xformers, flash-attn" in line


def test_omnigen_refuses_a_backend_its_attention_would_ignore(write_run: Any) -> None:
    updates = {"model_family": "omnigen", "attention_mechanism": "native-math"}
    with pytest.raises(ConfigError) as raised:
        load_config(write_run(config_updates=updates))
    (line,) = raised.value.problems
    assert "'attention_mechanism' = 'native-math': expected diffusers for omnigen" in line
    assert load_config(
        write_run(config_updates={"model_family": "omnigen"})
    ).training.memory.attention_mechanism == ("diffusers")


def test_the_training_transformer_runs_the_chosen_backend_on_cpu(
    write_run: Any, tiny_checkpoints: dict[str, Path], restore_attention: Any
) -> None:
    updates = {
        "model_family": "cosmos2image",
        "pretrained_model_name_or_path": str(tiny_checkpoints["cosmos2image"]),
        "mixed_precision": "no",
    }
    outputs = []
    for mechanism in ("diffusers", "native-math"):
        run = load_config(write_run(config_updates={**updates, "attention_mechanism": mechanism}))
        model = build_model(run, device=torch.device("cpu"), base_device=torch.device("cpu"))
        active, _ = _AttentionBackendRegistry.get_active_backend()
        # Cosmos2's attention dispatches to diffusers' active backend.
        assert active == (
            AttentionBackendName.NATIVE if mechanism == "diffusers" else AttentionBackendName._NATIVE_MATH
        )
        family = model.family
        items = synthetic_images(1, width=64, height=64)
        latents = family.encode_images(to_pixels([item.image for item in items]))
        conditioning = family.collate_conditioning(family.encode_prompts([item.caption for item in items]))
        with torch.no_grad():
            outputs.append(family.predict(model.transformer, latents, torch.tensor([0.5]), conditioning))
    # The math kernel computes the same attention as diffusers' default SDPA.
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-4, rtol=1e-4)


def test_a_backend_whose_kernel_is_missing_is_one_clear_line(
    write_run: Any, tiny_checkpoints: dict[str, Path], restore_attention: Any
) -> None:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("flash-attn is installed here")
    updates = {
        "pretrained_model_name_or_path": str(tiny_checkpoints["cosmos2image"]),
        "attention_mechanism": "flash-attn",
    }
    run = load_config(write_run(config_updates=updates))
    with pytest.raises(AttentionBackendError) as raised:
        build_model(run, device=torch.device("cpu"), base_device=torch.device("cpu"))
    (line,) = raised.value.problems
    assert line.startswith(
        "'attention_mechanism' = 'flash-attn': diffusers' 'flash' attention backend cannot run"
    )
    assert line.endswith("install its kernel there or set attention_mechanism to diffusers")
