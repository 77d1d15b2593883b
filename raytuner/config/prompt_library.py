"""raytuner's own built-in validation prompt library (``validation_prompt_library: true``).

SimpleTuner renders a built-in library of nickname -> prompt pairs beside ``validation_prompt``
when this key is true; raytuner ships its own, written for it, as a data file beside the
compatibility table. Its prompts are rendered like ``user_prompt_library`` entries and encoded
into the text cache with them.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from types import MappingProxyType
from typing import Any

LIBRARY_FILE = "validation_prompt_library.json"

# SimpleTuner's selectors for its image library (helpers/prompts.py); any true value means it too.
IMAGE_LIBRARY_NAMES = frozenset({"default", "image", "images"})
# SimpleTuner's selectors for its audio library, which has no meaning for an image family.
AUDIO_LIBRARY_NAMES = frozenset({"audio", "music", "audio_music", "audio-music"})


def library_selector(value: str) -> bool | None:
    """What a ``validation_prompt_library`` string other than true/false selects, as SimpleTuner
    reads it: True for its image library's names, False for an empty string, None for anything
    else (a file path, read as ``user_prompt_library``). An audio library name raises ValueError."""
    name = value.strip().lower()
    if name in AUDIO_LIBRARY_NAMES:
        raise ValueError(
            "true, false or 'image' (the built-in image prompt library); SimpleTuner's audio "
            "library is for audio models, and Cosmos2 and OmniGen render images"
        )
    if name in IMAGE_LIBRARY_NAMES:
        return True
    return False if not name else None


@functools.cache
def builtin_prompt_library() -> MappingProxyType[str, str]:
    """The built-in library, nickname -> prompt, in its file's order (read once, read-only)."""
    text = resources.files("raytuner.config").joinpath("data", LIBRARY_FILE).read_text(encoding="utf-8")
    library: Any = json.loads(text)
    if not isinstance(library, dict) or not all(
        isinstance(name, str) and isinstance(prompt, str) and prompt for name, prompt in library.items()
    ):
        # The file ships with the package; this guards against a broken install, not user input.
        raise ValueError(f"{LIBRARY_FILE}: expected a JSON object of nickname: prompt pairs")
    return MappingProxyType(library)
