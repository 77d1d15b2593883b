"""The run's seed when config.json leaves it unset: drawn once, recorded, reused.

SimpleTuner's default seed is None (a fresh one each start). raytuner draws one and records it
in ``<output_dir>/raytuner_seed.json`` so a run, its cache and its resume agree.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from raytuner.config.errors import ConfigError
from raytuner.config.paths import display

if TYPE_CHECKING:
    from raytuner.config.run import RunConfig

SEED_FILE_NAME = "raytuner_seed.json"


def seed_file(output_dir: Path) -> Path:
    return output_dir / SEED_FILE_NAME


def draw_seed() -> int:
    return secrets.randbelow(2**31)


def read_recorded_seed(output_dir: Path) -> int | None:
    path = seed_file(output_dir)
    if not path.is_file():
        return None
    try:
        seed = json.loads(path.read_text(encoding="utf-8"))["seed"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise ConfigError(
            f'{display(path)}: not a recorded seed (expected {{"seed": <whole number>}}); delete it to draw a new one'
        ) from None
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"{display(path)}: 'seed' = {seed!r}: expected a whole number >= 0")
    return seed


def record_seed(run: RunConfig) -> None:
    """Write the run's seed to ``<output_dir>/raytuner_seed.json`` (whole file or nothing)."""
    output_dir = run.training.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=output_dir, prefix=".raytuner_seed.", suffix=".tmp")
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        json.dump({"seed": run.seed}, stream)
        stream.write("\n")
    os.replace(temporary, seed_file(output_dir))
