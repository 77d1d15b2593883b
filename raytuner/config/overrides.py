"""A loaded run with some of its settings replaced: one point of a sweep, checked like the files.

``override_run`` replaces ``config.json`` fields and ``lycoris_config.json`` options of a
``RunConfig`` already loaded (paths resolved, datasets parsed), applying to each new value the
same coercion, aliases, choices and bounds as loading the files does, and the same cross-field
checks.

A lycoris option is replaced at the top level and rescaled in every ``apply_preset`` entry
(``module_algo_map``, ``name_algo_map``) that sets it, by the ratio of the new top-level value to
the old one: a preset that gives attention factor 16 and feed-forward factor 8 keeps that 2:1
ratio when ``factor`` goes from 16 to 8 (8 and 4), instead of silently keeping its old values,
and the base value itself leaves the preset exactly as written. Integer options are rounded (at
least 1); when either top-level value is not positive (``factor`` -1 asks lycoris to choose), the
entries take the new value as it is.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from raytuner.config.errors import ConfigError
from raytuner.config.fields import check_value, option_fields
from raytuner.config.keys import KeyFindings
from raytuner.config.loader import check_training
from raytuner.config.lycoris import LycorisConfig
from raytuner.config.run import RunConfig
from raytuner.config.training import TrainingConfig, replace_options

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")

PRESET_MAPS = ("module_algo_map", "name_algo_map")


def override_run(
    run: RunConfig,
    *,
    training: Mapping[str, Any] | None = None,
    lycoris: Mapping[str, Any] | None = None,
    where: str,
) -> RunConfig:
    """A copy of ``run`` with these values; ``ConfigError`` (one line per problem) naming ``where``."""
    problems: list[str] = []
    new_training = _override_training(run.training, training or {}, where=where, problems=problems)
    new_lycoris = run.lycoris
    if lycoris:
        if run.lycoris is None:
            problems.append(
                f"{where}: {', '.join(sorted(lycoris))} are lycoris_config.json options, but this config "
                "names no lycoris_config; set lora_type lycoris and lycoris_config in config.json"
            )
        else:
            new_lycoris = _override_lycoris(run.lycoris, lycoris, where=where, problems=problems)
    if problems:
        raise ConfigError(problems)
    findings = KeyFindings()
    check_training(new_training, where=where, findings=findings)
    if findings.problems:
        raise ConfigError(findings.problems)
    return dataclasses.replace(
        run,
        training=new_training,
        lycoris=new_lycoris,
        sources=dict(run.sources),
        warnings=list(run.warnings),
        notes=list(run.notes),
    )


def _override_training(
    training: TrainingConfig, values: Mapping[str, Any], *, where: str, problems: list[str]
) -> TrainingConfig:
    return replace_options(training, _checked(TrainingConfig, values, where=where, problems=problems))


def _replace_fields(obj: T, values: Mapping[str, Any], *, where: str, problems: list[str]) -> T:
    return dataclasses.replace(obj, **_checked(type(obj), values, where=where, problems=problems))


def _checked(cls: type, values: Mapping[str, Any], *, where: str, problems: list[str]) -> dict[str, Any]:
    """``values`` coerced and checked by the rules of ``cls``'s options (its sections' included)."""
    options = option_fields(cls)
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if key not in options:
            raise KeyError(f"{cls.__name__} has no option {key!r}")
        option, annotation = options[key]
        changes[key] = check_value(option, annotation, value, where=where, problems=problems)
    return changes


def _override_lycoris(
    lycoris: LycorisConfig, values: Mapping[str, Any], *, where: str, problems: list[str]
) -> LycorisConfig:
    before = len(problems)
    updated = _replace_fields(lycoris, values, where=where, problems=problems)
    if len(problems) > before or updated.apply_preset is None:
        return updated
    preset = copy.deepcopy(updated.apply_preset)
    for map_name in PRESET_MAPS:
        entries: dict[str, dict[str, Any]] | None = getattr(preset, map_name)
        for options in (entries or {}).values():
            rescale_preset_entry(
                options, {key: (getattr(lycoris, key), getattr(updated, key)) for key in values}
            )
    return dataclasses.replace(updated, apply_preset=preset)


def rescale_preset_entry(options: dict[str, Any], changes: Mapping[str, tuple[Any, Any]]) -> None:
    """Rescale, in place, the options of one preset entry: ``changes`` maps key -> (old, new) top-level values."""
    for key, (old, new) in changes.items():
        if key not in options:
            continue
        value = options[key]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (old, new, value))
        if not numeric or old <= 0 or new <= 0:
            options[key] = new
            continue
        scaled = value * new / old
        options[key] = max(1, round(scaled)) if isinstance(new, int) and isinstance(value, int) else scaled
