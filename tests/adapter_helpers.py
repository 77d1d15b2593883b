"""Helpers for the adapter tests: the seed configs' LoKr settings and one seeded render of a pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from raytuner.config import LycorisConfig, load_config
from raytuner.models.safety import PassThroughSafetyChecker

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VALIDATION_PROMPT = "a red circle on a blue background"


def seed_lycoris_config(family: str) -> LycorisConfig:
    spec = load_config(CONFIGS / family / "config.json").lycoris
    assert spec is not None
    return spec


def pipeline_extras(family: str) -> dict[str, object]:
    return {"safety_checker": PassThroughSafetyChecker()} if family == "cosmos2image" else {}


def generate(pipeline: object, seed: int = 7) -> np.ndarray:
    return pipeline(  # type: ignore[operator]
        prompt=VALIDATION_PROMPT,
        height=64,
        width=64,
        num_inference_steps=3,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images[0]
