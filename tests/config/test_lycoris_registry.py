"""The lycoris option registry raytuner ships matches the installed lycoris, so it cannot drift.

``raytuner/config/lycoris.py`` checks ``lycoris_config.json`` against
``raytuner/config/data/lycoris_registry.json`` instead of importing lycoris (and torch); these
tests regenerate that file from the installed lycoris and compare.
"""

from __future__ import annotations

import json

import pytest
from lycoris.config_sdk import ALGO_REGISTRY, VALID_PRESET_KEYS

from raytuner.config.lycoris import known_lycoris_keys, parse_lycoris
from raytuner.config.lycoris_registry import installed_registry, main, registry_path, shipped_registry

REGENERATE = "python -m raytuner.config.lycoris_registry --write"


def test_shipped_registry_is_the_installed_lycoris_registry(capsys: pytest.CaptureFixture[str]) -> None:
    # The generator's output, byte for byte: what --write would put in the file.
    assert main([]) == 0
    generated = capsys.readouterr().out
    shipped = registry_path().read_text(encoding="utf-8")
    assert generated == shipped, f"the shipped lycoris registry is stale: run `{REGENERATE}`"
    assert installed_registry() == shipped_registry()


def test_shipped_registry_holds_every_algorithm_option_and_preset_key() -> None:
    registry = shipped_registry()
    assert registry.algorithms == {name: tuple(spec.supported_args) for name, spec in ALGO_REGISTRY.items()}
    assert registry.preset_keys == tuple(VALID_PRESET_KEYS)
    assert json.loads(registry.to_json())["lycoris_version"] == registry.lycoris_version
    # Every option some algorithm accepts is a key lycoris_config.json may hold.
    assert {
        option for spec in ALGO_REGISTRY.values() for option in spec.supported_args
    } <= known_lycoris_keys()


def test_parse_lycoris_reads_algorithms_and_preset_keys_from_the_shipped_registry() -> None:
    parsed = parse_lycoris(
        {"algo": "LoKr", "apply_preset": {"target_module": ["Attention"], "exclude_name": []}},
        where="lycoris_config.json",
        strict=False,
    )
    assert parsed.problems == [] and parsed.config is not None and parsed.config.algo == "lokr"
    unknown = parse_lycoris({"algo": "lokrr"}, where="lycoris_config.json", strict=False)
    assert unknown.problems and "did you mean 'lokr'" in unknown.problems[0]
    preset = parse_lycoris(
        {"algo": "lokr", "apply_preset": {"target_modules": ["Attention"]}},
        where="lycoris_config.json",
        strict=False,
    )
    assert preset.problems and "unknown key 'target_modules'" in preset.problems[0]
    assert "target_module" in preset.problems[0]
