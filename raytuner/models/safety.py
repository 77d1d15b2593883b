"""Cosmos2 safety-checker policy and the test-model marker.

`Cosmos2TextToImagePipeline` screens every prompt and every generated image with
`cosmos_guardrail`'s `CosmosSafetyChecker`, as the NVIDIA Open Model License asks. That package
downloads its guard models from the hub, so it cannot run offline; without it the pipeline cannot
even be constructed. The policy here:

- `cosmos_guardrail` installed: use its checker, always.
- not installed, and the caller explicitly allows unscreened images (validation images inside
  training, tiny test models): a pass-through checker, with one warning in the log.
- not installed, no opt-out: a clear error saying what to install or which flag to pass.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from raytuner.errors import RaytunerError

logger = logging.getLogger(__name__)

TINY_CHECKPOINT_MARKER = "raytuner_tiny.json"
"""File written at the root of every checkpoint built by `raytuner.models.tiny`."""

GUARDRAIL_PACKAGE = "cosmos_guardrail"


class SafetyCheckerError(RaytunerError, RuntimeError):
    """No safety checker for a Cosmos2 pipeline that needs one, and how to get one."""


class PassThroughSafetyChecker:
    """Accepts every prompt and returns every image unchanged.

    It answers the three calls `Cosmos2TextToImagePipeline` makes on its checker: `to(device)`,
    `check_text_safety(prompt) -> bool` and `check_video_safety(frames) -> frames`, where frames is
    a uint8 array of shape (frames, height, width, channels). It is deliberately not a
    `torch.nn.Module`: the pipeline's `device`/`dtype` properties ask every module component for
    its `.device`, which a parameterless plain module does not have, and `safety_checker` sorts
    first among the components.
    """

    def to(self, *args: Any, **kwargs: Any) -> PassThroughSafetyChecker:
        return self

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, frames: np.ndarray) -> np.ndarray:
        return frames

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def is_guardrail_installed() -> bool:
    return importlib.util.find_spec(GUARDRAIL_PACKAGE) is not None


@functools.cache
def _warn_unscreened_once() -> None:
    logger.warning(
        "%s is not installed: Cosmos2 prompts and images are NOT screened by a safety checker "
        "(install it with `pip install %s` to screen them).",
        GUARDRAIL_PACKAGE,
        GUARDRAIL_PACKAGE,
    )


def load_safety_checker(*, allow_unscreened: bool) -> object:
    """The safety checker a `Cosmos2TextToImagePipeline` should be built with.

    Returns `cosmos_guardrail.CosmosSafetyChecker()` when that package is installed; otherwise a
    `PassThroughSafetyChecker` if `allow_unscreened` is True (warning once per process that
    images are not screened); otherwise raises `SafetyCheckerError`.
    """
    if is_guardrail_installed():
        from cosmos_guardrail import CosmosSafetyChecker

        try:
            return CosmosSafetyChecker()
        except Exception as exc:  # its guard models come from the hub; say so instead of a bare trace
            raise SafetyCheckerError(
                f"{GUARDRAIL_PACKAGE} is installed but its CosmosSafetyChecker could not be loaded "
                f"({type(exc).__name__}: {exc}). It downloads its guard models from the Hugging Face "
                "hub on first use; make them reachable or cached."
            ) from exc
    if not allow_unscreened:
        raise SafetyCheckerError(
            f"Cosmos2 generation needs a safety checker, and {GUARDRAIL_PACKAGE} is not installed. "
            f"Install it (`pip install {GUARDRAIL_PACKAGE}`, which downloads its guard models from the "
            "hub on first use), or opt out explicitly to generate unscreened images."
        )
    _warn_unscreened_once()
    return PassThroughSafetyChecker()


def is_tiny_checkpoint(path: str | Path) -> bool:
    """True when `path` is a local checkpoint folder built by `raytuner.models.tiny` (a test model).

    Anything else — a hub id, a missing folder, a folder without the marker or with an unreadable
    one — is treated as a real model, the side that keeps safety checks on.
    """
    marker = Path(path) / TINY_CHECKPOINT_MARKER
    try:
        content = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and content.get("test_model") is True
