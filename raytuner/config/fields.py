"""Turning one JSON object into one config dataclass: coercion and per-field rules.

Each dataclass field carries its rules in ``field(metadata=rule(...))``: allowed values,
SimpleTuner value aliases, values SimpleTuner has but raytuner does not support yet, numeric
bounds, and whether it names a path. The seeds write numbers and booleans as strings
(``"4e-5"``, ``"true"``); values are coerced to the field's type here, once, so no later code
sees a string-typed number.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from raytuner.config.redact import show_value
from raytuner.config.surface import did_you_mean

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")

PathKind = Literal["input_file", "input_dir", "output"]

TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
FALSE_WORDS = frozenset({"false", "no", "off", "0"})


def rule(
    *,
    choices: tuple[str, ...] | None = None,
    value_aliases: Mapping[str, str] | None = None,
    not_yet_supported: tuple[str, ...] = (),
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    path: PathKind | None = None,
    example: str | None = None,
) -> dict[str, Any]:
    """Field metadata understood by :func:`build`."""
    return {
        "choices": choices,
        "value_aliases": dict(value_aliases or {}),
        "not_yet_supported": not_yet_supported,
        "ge": ge,
        "gt": gt,
        "le": le,
        "path": path,
        "example": example,
    }


def derived() -> dict[str, Any]:
    """Field metadata of a value the loader parses from other options (a DeepSpeed plan, webhook
    targets): never read from config.json by name, never written back to it."""
    return {"derived": True}


def literal_values(annotation: Any) -> tuple[str, ...] | None:
    """The values of a ``Literal`` annotation (also inside ``X | None``); None for other types."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return literal_values(members[0]) if len(members) == 1 else None
    if typing.get_origin(annotation) is Literal:
        return tuple(str(value) for value in typing.get_args(annotation))
    return None


def field_rule(field: dataclasses.Field[Any], annotation: Any) -> dict[str, Any]:
    """The rules of one field: its ``rule(...)`` metadata, with a ``Literal`` type's values as
    the supported ones; what the rule's choices (SimpleTuner's list) add is refused by name."""
    meta = dict(field.metadata) if field.metadata and "choices" in field.metadata else rule()
    supported = literal_values(annotation)
    if supported is not None:
        meta["choices"] = meta["choices"] or supported
        meta["not_yet_supported"] = meta["not_yet_supported"] or tuple(
            choice for choice in meta["choices"] if choice not in supported
        )
    return meta


class CoercionError(Exception):
    """A value that is not of the expected kind; ``expected`` says what is."""

    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS | FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise CoercionError("true or false")


def _to_float(value: Any, example: str | None) -> float:
    expected = f"a number (e.g. {example or '1e-4'})"
    if isinstance(value, bool):
        raise CoercionError(expected)
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise CoercionError(expected) from None
    else:
        raise CoercionError(expected)
    if not math.isfinite(number):
        raise CoercionError(expected)
    return number


def _to_int(value: Any, example: str | None) -> int:
    expected = f"a whole number (e.g. {example or '1'})"
    if isinstance(value, bool):
        raise CoercionError(expected)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            try:
                number = float(value.strip())
            except ValueError:
                raise CoercionError(expected) from None
            if number.is_integer():
                return int(number)
    raise CoercionError(expected)


def _to_number(value: Any, example: str | None) -> int | float:
    """int when the value is whole (``1024``, ``"1024"``), float otherwise (``1.0`` megapixels)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return _to_float(value, example)


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise CoercionError("text")


def coerce(value: Any, annotation: Any, *, example: str | None = None) -> Any:
    """``value`` as ``annotation`` (bool, int, float, str, Path, list[str], dict, unions with None)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if value is None:
            return None
        if set(members) == {int, float}:
            return _to_number(value, example)
        lists = any(typing.get_origin(m) is list for m in members)
        if (
            len(members) == 2 + lists
            and str in members
            and any(typing.get_origin(m) is dict for m in members)
        ):
            # Text or an object (deepspeed_config: a path, JSON text, or the object inline), or
            # also a list of objects (webhook_config).
            if isinstance(value, dict):
                return dict(value)
            if lists and isinstance(value, list):
                return list(value)
            try:
                return _to_str(value)
            except CoercionError:
                raise CoercionError("text, an object or a list" if lists else "text or an object") from None
        if len(members) == 1:
            return coerce(value, members[0], example=example)
        raise TypeError(f"unsupported field type {annotation!r}")
    if origin is Literal:
        return _to_str(value)  # which values: check_rules, with SimpleTuner's list for the message
    if annotation is bool:
        return _to_bool(value)
    if annotation is int:
        return _to_int(value, example)
    if annotation is float:
        return _to_float(value, example)
    if annotation is str:
        return _to_str(value)
    if annotation is Path:
        if isinstance(value, str) and value.strip():
            return Path(value)
        raise CoercionError("a path")
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise CoercionError('a list of names (e.g. ["Attention"])')
        return list(value)
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise CoercionError("an object")
        return dict(value)
    raise TypeError(f"unsupported field type {annotation!r}")


def _bounds_text(meta: Mapping[str, Any]) -> str:
    parts = []
    if meta["gt"] is not None:
        parts.append(f"> {meta['gt']:g}")
    if meta["ge"] is not None:
        parts.append(f">= {meta['ge']:g}")
    if meta["le"] is not None:
        parts.append(f"<= {meta['le']:g}")
    return " and ".join(parts)


def check_rules(value: Any, meta: Mapping[str, Any]) -> Any:
    """Apply value aliases, choices and bounds; returns the (possibly aliased) value."""
    if value is None:
        return None
    if isinstance(value, str):
        value = meta["value_aliases"].get(value, value)
        if value in meta["not_yet_supported"]:
            supported = ", ".join(c for c in meta["choices"] or () if c not in meta["not_yet_supported"])
            raise CoercionError(
                f"a value raytuner supports ('{value}' is not supported yet; use one of: {supported})"
            )
        if meta["choices"] is not None and value not in meta["choices"]:
            hint = did_you_mean(value, meta["choices"])
            raise CoercionError(f"one of: {', '.join(meta['choices'])}{hint}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        low_ok = (meta["gt"] is None or value > meta["gt"]) and (meta["ge"] is None or value >= meta["ge"])
        high_ok = meta["le"] is None or value <= meta["le"]
        if not (low_ok and high_ok):
            raise CoercionError(f"a number {_bounds_text(meta)}")
    return value


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def option_fields(cls: type) -> dict[str, tuple[dataclasses.Field[Any], Any]]:
    """The options ``cls`` reads from a file, with each one's field and type: its own fields and
    its sections' fields (derived fields, parsed from other options, are no option of their own)."""
    hints = field_types(cls)
    options: dict[str, tuple[dataclasses.Field[Any], Any]] = {}
    for field in dataclasses.fields(cls):
        if field.metadata.get("derived"):
            continue
        if _is_section(hints[field.name]):
            options.update(option_fields(hints[field.name]))
        else:
            options[field.name] = (field, hints[field.name])
    return options


def field_names(cls: type) -> frozenset[str]:
    return frozenset(option_fields(cls))


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


def problem(where: str, key: str, value: Any, expected: str, fix: str = "") -> str:
    """One self-contained error line: where, key, value, what was expected, how to fix."""
    line = f"{where}: '{key}' = {show_value(key, value)}: expected {expected}"
    return f"{line}; {fix}" if fix else line


def build(cls: type[T], raw: Mapping[str, Any], *, where: str, problems: list[str]) -> T | None:
    """An instance of the dataclass ``cls`` from the keys of ``raw`` that are its fields.

    A field whose type is itself a dataclass (a section of ``TrainingConfig``) is built from the
    same flat ``raw``, as config.json keeps every option at its top level; derived fields are
    left to the loader. Keys that are not fields are ignored here (the caller has already sorted
    them). A problem is appended for every bad value and missing required field; None is
    returned if any.
    """
    hints = field_types(cls)
    kwargs: dict[str, Any] = {}
    before = len(problems)
    for field in dataclasses.fields(cls):
        annotation = hints[field.name]
        if field.metadata.get("derived"):
            continue
        if _is_section(annotation):
            kwargs[field.name] = build(annotation, raw, where=where, problems=problems)
            continue
        if field.name not in raw:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                problems.append(f"{where}: '{field.name}' is required but not set")
            continue
        value = raw[field.name]
        if value is None and typing.get_origin(annotation) not in (typing.Union, types.UnionType):
            continue  # JSON null on a non-optional field: keep the default, as SimpleTuner does
        kwargs[field.name] = check_value(field, annotation, value, where=where, problems=problems)
    if len(problems) > before:
        return None
    return cls(**kwargs)


def check_value(
    field: dataclasses.Field[Any], annotation: Any, value: Any, *, where: str, problems: list[str]
) -> Any:
    """``value`` coerced and checked by the field's rules; on a problem, it is appended and
    the value returned as given (the caller sees the problem count grow)."""
    meta = field_rule(field, annotation)
    try:
        return check_rules(coerce(value, annotation, example=meta["example"]), meta)
    except CoercionError as error:
        problems.append(problem(where, field.name, value, error.expected))
        return value


def to_plain(value: Any) -> Any:
    """Dataclasses, Paths and containers as JSON-ready values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: to_plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(key): to_plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(item) for item in value]
    return value
