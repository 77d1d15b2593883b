"""LyCORIS's option registry, shipped as data so that checking a config imports no lycoris.

``lycoris.config_sdk`` lists the algorithms lycoris knows, the options each accepts and the keys
``apply_preset`` takes. Importing it imports lycoris, and lycoris imports torch, transformers and
diffusers: most of the time ``raytuner check-config`` took to read three JSON files. The
registry of the installed release is written to ``data/lycoris_registry.json`` instead, and
``tests/config/test_lycoris_registry.py`` fails when that file no longer matches the installed
lycoris. After upgrading lycoris, regenerate it:

    python -m raytuner.config.lycoris_registry --write
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import metadata, resources
from pathlib import Path

_DATA_PACKAGE = "raytuner.config.data"
REGISTRY_FILE = "lycoris_registry.json"
LYCORIS_DISTRIBUTION = "lycoris-lora"


@dataclass(frozen=True, kw_only=True)
class LycorisRegistry:
    """What ``lycoris.config_sdk`` says about one lycoris release."""

    lycoris_version: str
    algorithms: dict[str, tuple[str, ...]]  # algorithm -> the options it accepts (ALGO_REGISTRY)
    preset_keys: tuple[str, ...]  # VALID_PRESET_KEYS, in lycoris's order

    def to_json(self) -> str:
        plain = {
            "lycoris_version": self.lycoris_version,
            "algorithms": {name: list(options) for name, options in self.algorithms.items()},
            "preset_keys": list(self.preset_keys),
        }
        return json.dumps(plain, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> LycorisRegistry:
        plain = json.loads(text)
        return cls(
            lycoris_version=plain["lycoris_version"],
            algorithms={name: tuple(options) for name, options in plain["algorithms"].items()},
            preset_keys=tuple(plain["preset_keys"]),
        )


@cache
def shipped_registry() -> LycorisRegistry:
    """The registry shipped with raytuner (``data/lycoris_registry.json``): no lycoris import."""
    text = resources.files(_DATA_PACKAGE).joinpath(REGISTRY_FILE).read_text(encoding="utf-8")
    return LycorisRegistry.from_json(text)


def installed_registry() -> LycorisRegistry:
    """The registry of the lycoris installed here, read from ``lycoris.config_sdk`` (imports torch)."""
    from lycoris.config_sdk import ALGO_REGISTRY, VALID_PRESET_KEYS

    return LycorisRegistry(
        lycoris_version=metadata.version(LYCORIS_DISTRIBUTION),
        algorithms={name: tuple(spec.supported_args) for name, spec in ALGO_REGISTRY.items()},
        preset_keys=tuple(VALID_PRESET_KEYS),
    )


def registry_path() -> Path:
    """Where the shipped registry lives in this checkout (the file ``--write`` replaces)."""
    return Path(__file__).resolve().parent / "data" / REGISTRY_FILE


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m raytuner.config.lycoris_registry",
        description="Print (or with --write, save) the installed lycoris's option registry as raytuner ships it.",
    )
    parser.add_argument("--write", action="store_true", help=f"replace {_DATA_PACKAGE}/{REGISTRY_FILE}")
    args = parser.parse_args(argv)
    text = installed_registry().to_json()
    if args.write:
        registry_path().write_text(text, encoding="utf-8")
        print(f"wrote {registry_path()}")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
