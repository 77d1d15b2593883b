"""``RunConfig``: the root config of one run — the three files, typed, with where each came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raytuner.config.datasets import DatasetConfig
from raytuner.config.fields import to_plain
from raytuner.config.lycoris import LycorisConfig
from raytuner.config.redact import redact as redact_secrets
from raytuner.config.training import TrainingConfig


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """``training`` from config.json, ``datasets`` from multidatabackend.json, ``lycoris`` from
    lycoris_config.json.

    ``sources`` maps each file's role (``config``, ``data_backend_config``, ``lycoris_config``,
    ``user_prompt_library``, ``seed``) to its resolved path. ``warnings`` are things the user
    should read; ``notes`` are SimpleTuner-compatible mappings applied on the way in.
    ``seed_drawn`` is True when config.json left ``seed`` unset and raytuner chose it (now,
    or in an earlier run that recorded it in ``<output_dir>/raytuner_seed.json``).
    """

    training: TrainingConfig
    datasets: list[DatasetConfig]
    lycoris: LycorisConfig | None
    sources: dict[str, Path]
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seed_drawn: bool = False

    @property
    def seed(self) -> int:
        if self.training.seed is None:
            raise RuntimeError("RunConfig built without a seed; use load_config()")
        return self.training.seed

    @property
    def enabled_datasets(self) -> list[DatasetConfig]:
        return [dataset for dataset in self.datasets if dataset.enabled]

    def to_dict(self, *, redact: bool = True) -> dict[str, Any]:
        """JSON-ready form; credentials are ``***`` unless ``redact=False``."""
        plain = {
            "sources": to_plain(self.sources),
            "training": to_plain(self.training.flat()),  # config.json's flat keys
            "datasets": to_plain(self.datasets),
            "lycoris": to_plain(self.lycoris),
            "seed_drawn": self.seed_drawn,
            "warnings": list(self.warnings),
            "notes": list(self.notes),
        }
        return redact_secrets(plain) if redact else plain
