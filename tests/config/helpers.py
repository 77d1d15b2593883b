"""Helpers for the config tests: a small valid run written into a temporary folder."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

BASE_CONFIG: dict[str, Any] = {
    "model_family": "cosmos2image",
    "model_type": "lora",
    "lora_type": "lycoris",
    "lycoris_config": "lycoris_config.json",
    "data_backend_config": "multidatabackend.json",
    "output_dir": "output",
    "max_train_steps": 10,
    "seed": 7,
}
BASE_DATASETS: list[dict[str, Any]] = [
    {"id": "images", "type": "local", "instance_data_dir": "images", "caption_strategy": "filename"},
    {
        "id": "text",
        "type": "local",
        "dataset_type": "text_embeds",
        "default": True,
        "cache_dir": "cache/text",
    },
]
BASE_LYCORIS: dict[str, Any] = {
    "algo": "lokr",
    "multiplier": 1.0,
    "linear_dim": 10000,
    "linear_alpha": 1,
    "factor": 4,
}

WriteRun = Callable[..., Path]


def make_write_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> WriteRun:
    """Write config.json, multidatabackend.json and lycoris_config.json into tmp_path and chdir there.

    ``config`` / ``datasets`` / ``lycoris`` replace the files' content (``config_updates`` merges);
    a ``str`` is written as the file's raw text. Returns the config.json path.
    """

    def write(
        *,
        config: dict[str, Any] | str | None = None,
        config_updates: dict[str, Any] | None = None,
        datasets: Any = None,
        lycoris: dict[str, Any] | str | None = None,
        make_images: bool = True,
    ) -> Path:
        monkeypatch.chdir(tmp_path)
        body = dict(BASE_CONFIG) if config is None else config
        if isinstance(body, dict) and config_updates:
            body = {**body, **config_updates}
        files = {
            "config.json": body,
            "multidatabackend.json": BASE_DATASETS if datasets is None else datasets,
            "lycoris_config.json": BASE_LYCORIS if lycoris is None else lycoris,
        }
        for name, content in files.items():
            text = content if isinstance(content, str) else json.dumps(content, indent=2)
            (tmp_path / name).write_text(text, encoding="utf-8")
        if make_images:
            (tmp_path / "images").mkdir(exist_ok=True)
        return tmp_path / "config.json"

    return write


def clear_config_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset the variables that choose SimpleTuner's config file, so a test sets only its own."""
    from raytuner.config.search import BACKEND_VARIABLES, ENVIRONMENT_VARIABLES

    for name in (*ENVIRONMENT_VARIABLES, *BACKEND_VARIABLES, "CONFIG_PATH"):
        monkeypatch.delenv(name, raising=False)
