"""Sorting the keys of one config file by the compatibility table.

Every key a file holds is one of: a raytuner field (kept; if its status is still
``not-yet-supported`` and the value asks for something, it is reported as such), a
``not-applicable`` key (warning saying what replaces it, unless the value asks for nothing), a
``not-yet-supported`` key without a field (reported), or unknown: an error when it is a near miss
of a known key (``learning-rate``), else a warning with the closest known key (an error under
``--strict``).
Not-yet-supported keys are collected across all three files, so ``--strict`` can refuse them in
one error that lists them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from raytuner.config.compatibility import KeyStatus, Scope, key_status, keys_in
from raytuner.config.redact import show_value
from raytuner.config.surface import did_you_mean, near_miss


@dataclass(kw_only=True)
class UnsupportedKey:
    """A not-yet-supported key set to a value that asks for something, and where it was set."""

    where: str  # the file
    key: str
    value: Any
    row: KeyStatus
    places: list[str] = field(default_factory=list)  # e.g. "dataset 'pets'"; empty for config.json
    values_differ: bool = False  # set in several places with different values

    def warning(self) -> str:
        places = f" (in {', '.join(self.places)})" if self.places else ""
        shown = "" if self.values_differ else f" = {show_value(self.key, self.value)}"
        return (
            f"{self.where}: accepted, not yet supported: {self.key}{shown}"
            f"{places} ({self.row.note}); the run will not do what it asks"
        )


@dataclass
class KeyFindings:
    """What sorting a file's keys found, before ``--strict`` decides what is an error."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unsupported: dict[tuple[str, str], UnsupportedKey] = field(default_factory=dict)

    def add_unsupported(self, *, where: str, key: str, value: Any, row: KeyStatus, place: str | None) -> None:
        entry = self.unsupported.setdefault(
            (where, key), UnsupportedKey(where=where, key=key, value=value, row=row)
        )
        entry.values_differ |= entry.value != value
        if place and place not in entry.places:
            entry.places.append(place)

    def merge(self, other: KeyFindings) -> None:
        self.problems.extend(other.problems)
        self.warnings.extend(other.warnings)
        self.notes.extend(other.notes)
        for (where, key), entry in other.unsupported.items():
            mine = self.unsupported.setdefault((where, key), entry)
            if mine is not entry:
                mine.places.extend(place for place in entry.places if place not in mine.places)

    def settle_unsupported(self, *, strict: bool) -> None:
        """One warning per not-yet-supported key; under ``strict``, one error listing them all."""
        entries = list(self.unsupported.values())
        self.unsupported.clear()
        if not entries:
            return
        if not strict:
            self.warnings.extend(entry.warning() for entry in entries)
            return
        by_file: dict[str, list[str]] = {}
        for entry in entries:
            by_file.setdefault(entry.where, []).append(entry.key)
        listed = "; ".join(f"{where}: {', '.join(keys)}" for where, keys in by_file.items())
        self.problems.append(
            f"not yet supported by raytuner (--strict refuses them): {listed}; remove these keys, "
            "or run without --strict to continue with a warning for each"
        )


def sort_key(
    key: str,
    value: Any,
    *,
    scope: Scope,
    where: str,
    fields: frozenset[str],
    strict: bool,
    findings: KeyFindings,
    place: str | None = None,
    written: str | None = None,
) -> bool:
    """Classify one key; True when it is a field the caller should keep.

    ``where`` is the file, ``place`` the entry inside it (a dataset), ``written`` the key as the
    file spells it when that differs (a leading ``--``).
    """
    label = f"{where}: {place}" if place else where
    row = key_status(key, scope)
    if row is None:
        if key in fields:
            return True
        known = fields | keys_in(scope)
        meant = near_miss(key, known)
        if meant is not None:
            # A misspelt key would leave its option at the default, silently changing the run.
            findings.problems.append(
                f"{label}: unknown key '{written or key}' (did you mean '{meant}'?); fix the spelling, "
                f"or the run would use the default {meant}"
            )
            return False
        message = f"{label}: unknown key '{written or key}'{did_you_mean(key, known)}"
        (findings.problems if strict else findings.warnings).append(message)
        return False
    if row.status == "not-yet-supported" and not row.asks_nothing(value):
        findings.add_unsupported(where=where, key=key, value=value, row=row, place=place)
    elif row.status == "not-applicable" and not row.asks_nothing(value):
        # Kept when it is a field: the value still goes where SimpleTuner would send it.
        findings.warnings.append(f"{label}: ignored, not applicable to raytuner: '{key}': {row.note}")
    elif row.status in ("honoured", "alias") and key not in fields:
        # The table promises a field or an alias mapping the caller handles; reaching here is a bug.
        raise AssertionError(f"{scope} key '{key}' is {row.status} in the compatibility table but unhandled")
    return key in fields


def sort_block_keys(
    block: str,
    value: dict[str, Any],
    *,
    fields: frozenset[str],
    where: str,
    place: str,
    strict: bool,
    findings: KeyFindings,
) -> dict[str, Any]:
    """The keys of a dataset entry's nested ``block`` object that are its fields; every other key is
    classified (and reported) by the compatibility table as ``<block>.<key>``."""
    return {
        key: item
        for key, item in value.items()
        if sort_key(
            f"{block}.{key}",
            item,
            scope="dataset",
            where=where,
            place=place,
            fields=fields,
            strict=strict,
            findings=findings,
        )
    }
