"""Validation keys as the config reads them (no model, no Ray): validation_prompt_library (raytuner's
built-in prompt library, its selectors, how it joins user_prompt_library and validation_prompt)
and validation_guidance_rescale (no effect on these families' pipelines)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raytuner.cache.settings import role_prompts
from raytuner.config import ConfigError, load_config
from raytuner.config.prompt_library import builtin_prompt_library
from raytuner.evaluate.validation import image_filename
from tests.config.helpers import make_write_run


def test_the_builtin_library_is_a_varied_set_of_named_prompts() -> None:
    library = builtin_prompt_library()
    assert len(library) >= 12
    assert len(set(library.values())) == len(library)
    for nickname, prompt in library.items():
        # Nicknames are file names as they are: no character is replaced when an image is written.
        assert image_filename(nickname, 32, 32) == f"{nickname}-32x32.png"
        assert prompt.strip() == prompt and len(prompt.split()) >= 6
    with pytest.raises(TypeError):
        library["extra"] = "read-only, shared by every caller"  # type: ignore[index]


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), ("true", True), ("image", True), ("Default", True), (False, False), ("", False)],
)
def test_simpletuner_selectors_choose_the_builtin_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: object, expected: bool
) -> None:
    write_run = make_write_run(tmp_path, monkeypatch)
    run = load_config(write_run(config_updates={"validation_prompt_library": value}))
    assert run.training.validation.validation_prompt_library is expected
    assert run.training.validation.user_prompt_library is None
    assert not [w for w in run.warnings if "validation_prompt_library" in w]


def test_an_audio_library_is_refused_and_a_path_is_a_user_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_run = make_write_run(tmp_path, monkeypatch)
    with pytest.raises(
        ConfigError, match=r"'validation_prompt_library' = 'music': expected true, false or 'image'"
    ):
        load_config(write_run(config_updates={"validation_prompt_library": "music"}))
    (tmp_path / "prompts.json").write_text(json.dumps({"a": "a prompt"}))
    run = load_config(write_run(config_updates={"validation_prompt_library": "prompts.json"}))
    assert run.training.validation.user_prompt_library == tmp_path / "prompts.json"
    assert run.training.validation.validation_prompt_library is False


def test_the_builtin_library_renders_beside_the_users_and_validation_prompt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_run = make_write_run(tmp_path, monkeypatch)
    builtin = builtin_prompt_library()
    replaced = next(iter(builtin))
    (tmp_path / "prompts.json").write_text(json.dumps({"mine": "my own prompt", replaced: "my version"}))
    both = {
        "validation_prompt": "the main prompt",
        "validation_prompt_library": True,
        "user_prompt_library": "prompts.json",
    }
    texts = role_prompts(load_config(write_run(config_updates=both)))["validation"]
    # As SimpleTuner: the built-in library, then the user's (the same nickname: the user's prompt).
    assert list(texts) == ["validation", *builtin, "mine"]
    assert texts[replaced] == "my version" and texts["mine"] == "my own prompt"
    assert all(texts[name] == prompt for name, prompt in builtin.items() if name != replaced)
    off = role_prompts(load_config(write_run(config_updates={**both, "validation_prompt_library": False})))
    assert list(off["validation"]) == ["validation", "mine", replaced]


@pytest.mark.parametrize("value", [0, "0.0", None])
def test_guidance_rescale_left_off_is_silent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: object
) -> None:
    write_run = make_write_run(tmp_path, monkeypatch)
    run = load_config(write_run(config_updates={"validation_guidance_rescale": value}))
    assert not [w for w in run.warnings if "validation_guidance_rescale" in w]


@pytest.mark.parametrize("value", [0.7, "1.5"])
def test_guidance_rescale_set_says_it_has_no_effect_and_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: object
) -> None:
    write_run = make_write_run(tmp_path, monkeypatch)
    run = load_config(write_run(config_updates={"validation_guidance_rescale": value}))
    warned = [w for w in run.warnings if "validation_guidance_rescale" in w]
    assert len(warned) == 1
    assert "not applicable to raytuner" in warned[0] and "take no guidance_rescale argument" in warned[0]
    assert "not yet supported" not in warned[0]
