"""``LycorisConfig``: SimpleTuner's ``lycoris_config.json``, checked against the lycoris package.

The valid algorithms, preset keys and per-algorithm options are lycoris's own
(``lycoris.config_sdk``), read from the copy raytuner ships (``raytuner.config.lycoris_registry``):
checking a file imports neither lycoris nor torch, and a test fails when the copy no longer
matches the installed lycoris release.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from raytuner.config.fields import CoercionError, build, coerce, field_names, problem, rule, to_plain
from raytuner.config.keys import KeyFindings, sort_key
from raytuner.config.lycoris_registry import shipped_registry
from raytuner.config.surface import did_you_mean

TESTED_ALGO = "lokr"

# lycoris's own spelling of an option -> raytuner's field. create_lycoris reads weight
# decomposition as dora_wd, and turns Tucker on when any of its four spellings asks for it.
KEY_SPELLINGS: dict[str, str] = {
    "disable_conv_cp": "use_tucker",
    "use_cp": "use_tucker",
    "use_conv_cp": "use_tucker",
    "dora_wd": "weight_decompose",
}
# create_lycoris copies disable_conv_cp's value into use_tucker and also reads "not
# disable_conv_cp": whatever its value, the key's presence turns Tucker on. SimpleTuner users get
# that behaviour, so raytuner reads it the same way and says so.
PRESENCE_SPELLINGS = frozenset({"disable_conv_cp"})


@dataclass(frozen=True, kw_only=True)
class PresetConfig:
    """``apply_preset``: which modules LyCORIS wraps, with per-module overrides.

    Keys are lycoris's preset keys (``lycoris.config_sdk.VALID_PRESET_KEYS``); ``None`` means
    not set (lycoris keeps its own value).
    """

    target_module: list[str] | None = None
    target_name: list[str] | None = None
    module_algo_map: dict[str, dict[str, Any]] | None = None
    name_algo_map: dict[str, dict[str, Any]] | None = None
    enable_conv: bool | None = None
    lora_prefix: str | None = None
    use_fnmatch: bool | None = None
    unet_target_module: list[str] | None = None
    unet_target_name: list[str] | None = None
    text_encoder_target_module: list[str] | None = None
    text_encoder_target_name: list[str] | None = None
    exclude_name: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The preset as lycoris's ``LycorisNetwork.apply_preset`` takes it (unset keys left out).

        An empty list set on purpose stays: ``"target_module": []`` means no module classes, while
        leaving it out means lycoris's own defaults (every Linear, Conv and norm).
        """
        plain = to_plain(self)
        return {key: value for key, value in plain.items() if value is not None}


@dataclass(frozen=True, kw_only=True)
class LycorisConfig:
    """Everything from ``lycoris_config.json``, typed."""

    algo: str = "lora"  # lycoris's default when the file names none
    multiplier: float = 1.0
    linear_dim: int = field(default=4, metadata=rule(ge=1))
    linear_alpha: float = field(default=1.0, metadata=rule(ge=0))
    factor: int = field(default=-1, metadata=rule(ge=-1))
    full_matrix: bool = False
    bypass_mode: bool = False
    conv_dim: int | None = field(default=None, metadata=rule(ge=0))
    conv_alpha: float | None = field(default=None, metadata=rule(ge=0))
    dropout: float = field(default=0.0, metadata=rule(ge=0, le=1))
    rank_dropout: float = field(default=0.0, metadata=rule(ge=0, le=1))
    module_dropout: float = field(default=0.0, metadata=rule(ge=0, le=1))
    use_tucker: bool = False
    use_scalar: bool = False
    rank_dropout_scale: bool = False
    decompose_both: bool = False
    weight_decompose: bool = False
    wd_on_output: bool = True
    unbalanced_factorization: bool = False
    train_norm: bool = False
    preset: str | None = None
    apply_preset: PresetConfig | None = None

    def create_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``lycoris.create_lycoris`` in lycoris's own spelling.

        ``apply_preset`` is not among them: pass ``apply_preset.to_dict()`` to
        ``LycorisNetwork.apply_preset`` first.
        """
        plain = to_plain(self)
        plain.pop("apply_preset")
        plain["dora_wd"] = plain.pop("weight_decompose")
        return {key: value for key, value in plain.items() if value is not None}


@dataclass(kw_only=True)
class ParsedLycoris:
    config: LycorisConfig | None = None
    findings: KeyFindings = field(default_factory=KeyFindings)

    @property
    def problems(self) -> list[str]:
        return self.findings.problems

    @property
    def warnings(self) -> list[str]:
        return self.findings.warnings


def _lycoris_registry() -> tuple[dict[str, tuple[str, ...]], tuple[str, ...]]:
    """lycoris's algorithms (-> the options each accepts) and its preset keys."""
    registry = shipped_registry()
    return registry.algorithms, registry.preset_keys


def known_lycoris_keys() -> frozenset[str]:
    """Fields plus every option some lycoris algorithm accepts (passed through, not yet used)."""
    algos, _ = _lycoris_registry()
    options = {option for supported in algos.values() for option in supported}
    return (
        field_names(LycorisConfig)
        | frozenset(KEY_SPELLINGS)
        | options
        | {"block_size", "constraint", "rescaled"}
    )


def _tucker_request(key: str, value: Any, *, where: str, findings: KeyFindings) -> bool:
    """Whether one of Tucker's spellings turns it on, read as lycoris's create_lycoris reads it."""
    try:
        on = coerce(value, bool)
    except CoercionError as error:
        findings.problems.append(problem(where, key, value, error.expected))
        return False
    if key in PRESENCE_SPELLINGS:
        findings.warnings.append(
            f"{where}: '{key}' = {str(on).lower()} turns Tucker decomposition on: lycoris's create_lycoris "
            "(which SimpleTuner calls) does so whenever the key is present, and raytuner reads it the same "
            "way; write 'use_tucker' instead to say what you mean"
        )
        return True
    return on


def parse_lycoris(raw: Any, *, where: str, strict: bool) -> ParsedLycoris:
    result = ParsedLycoris()
    if not isinstance(raw, dict):
        result.problems.append(
            f'{where}: expected a JSON object ({{"algo": "lokr", ...}}), got {type(raw).__name__}'
        )
        return result
    algos, preset_keys = _lycoris_registry()
    fields = field_names(LycorisConfig)
    values: dict[str, Any] = {}
    tucker_requests: list[bool] = []
    entries: dict[str, Any] = raw  # a JSON object: its keys are strings
    for key, value in entries.items():
        name = KEY_SPELLINGS.get(key, key)
        if name == "use_tucker":
            tucker_requests.append(_tucker_request(key, value, where=where, findings=result.findings))
            continue
        if sort_key(
            name,
            value,
            scope="lycoris",
            where=where,
            fields=fields,
            strict=strict,
            findings=result.findings,
            written=key,
        ):
            values[name] = value

    if tucker_requests:
        values["use_tucker"] = any(tucker_requests)
    algo = values.get("algo", "lora")
    if isinstance(algo, str):
        values["algo"] = algo = algo.lower()
    if algo not in algos:
        result.problems.append(
            f"{where}: 'algo' = {algo!r}: expected one lycoris knows: {', '.join(algos)}"
            f"{did_you_mean(str(algo), algos)}; raytuner trains and tests 'lokr'"
        )
    elif algo != TESTED_ALGO:
        result.warnings.append(
            f"{where}: 'algo' = {algo!r} is supported by lycoris but not tested by raytuner (tested: lokr)"
        )

    preset_raw = values.pop("apply_preset", None)
    config = build(LycorisConfig, values, where=where, problems=result.problems)
    preset = _parse_preset(
        preset_raw, where=where, algos=algos, preset_keys=preset_keys, problems=result.problems
    )
    if config is not None and not result.problems:
        result.config = dataclasses.replace(config, apply_preset=preset)
    return result


def _parse_preset(
    raw: Any,
    *,
    where: str,
    algos: dict[str, tuple[str, ...]],
    preset_keys: tuple[str, ...],
    problems: list[str],
) -> PresetConfig | None:
    if raw is None or raw == {}:
        return None
    label = f"{where}: apply_preset"
    if not isinstance(raw, dict):
        problems.append(f'{label}: expected an object ({{"target_module": [...]}}), got {type(raw).__name__}')
        return None
    before = len(problems)
    for key in raw:
        if key not in preset_keys:
            # lycoris raises on an unknown preset key, so this is an error, not a warning.
            problems.append(
                f"{label}: unknown key '{key}'{did_you_mean(key, preset_keys)}; valid keys: {', '.join(preset_keys)}"
            )
    for map_key in ("module_algo_map", "name_algo_map"):
        for target, override in (raw.get(map_key) or {}).items():
            where_override = f"{label}.{map_key}.{target}"
            if not isinstance(override, dict):
                problems.append(f'{where_override}: expected an object of options (e.g. {{"factor": 8}})')
                continue
            override_algo = override.get("algo")
            if override_algo is not None and str(override_algo).lower() not in algos:
                problems.append(
                    f"{where_override}: 'algo' = {override_algo!r}: expected one lycoris knows: {', '.join(algos)}"
                    f"{did_you_mean(str(override_algo), algos)}"
                )
    if len(problems) > before:
        return None
    return build(PresetConfig, raw, where=label, problems=problems)
