"""The SimpleTuner compatibility table: what raytuner does with every key a user's files may hold.

One table, ``raytuner/config/data/compatibility.tsv``, gives each key of SimpleTuner's
``config.json`` and ``multidatabackend.json``, of ``lycoris_config.json`` and raytuner's own
``ray_*`` keys exactly one status:

- ``honoured``: implemented end to end; ``test`` names the test that shows the key changes
  what raytuner does (a key is not honoured until such a test exists and passes).
- ``alias``: an older or alternative spelling, mapped the way SimpleTuner maps it.
- ``not-yet-supported``: accepted with a warning naming it (an error under ``--strict``),
  because the run will not do what it asks. ``inert`` lists the values that ask for nothing
  raytuner does not already do (``false`` for a feature switch, ``*`` for a setting that only
  qualifies another option); setting one of those is silent.
- ``not-applicable``: meaningless on raytuner (an Accelerate launcher setting, another model
  family's option); the warning says what replaces it. ``inert`` works as above: a switch left
  off, or a setting whose every value asks for nothing raytuner does not already do, is silent.

The loader, ``raytuner check-config --keys`` and ``docs/simpletuner-compatibility.md`` all read
this table, so they cannot disagree.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Literal

Status = Literal["honoured", "alias", "not-yet-supported", "not-applicable"]
Scope = Literal["config", "dataset", "lycoris", "raytuner"]

STATUSES: tuple[Status, ...] = ("honoured", "alias", "not-yet-supported", "not-applicable")
SCOPES: tuple[Scope, ...] = ("config", "dataset", "lycoris", "raytuner")
TABLE_FILE = "compatibility.tsv"
ANY_VALUE = "*"


@dataclass(frozen=True, kw_only=True)
class KeyStatus:
    """One row of the table."""

    key: str
    scope: Scope
    status: Status
    note: str
    test: str = ""  # honoured rows: one test node id, or several separated by commas
    inert: tuple[Any, ...] | None = None  # None: every value asks for something

    @property
    def tests(self) -> tuple[str, ...]:
        """The test node ids of ``test``."""
        return tuple(part.strip() for part in self.test.split(",") if part.strip())

    def asks_nothing(self, value: Any) -> bool:
        """True when ``value`` asks for nothing raytuner does not already do (no warning needed)."""
        if self.inert is None:
            return False
        if ANY_VALUE in self.inert:
            return True
        normalised = _normalise(value)
        return any(_same(normalised, inert) for inert in self.inert)


def _normalise(value: Any) -> Any:
    # The seeds write booleans and numbers as strings ("false", "0"); compare them as JSON values.
    if isinstance(value, str):
        text = value.strip()
        try:
            return json.loads(text.lower() if text.lower() in ("true", "false", "null") else text)
        except json.JSONDecodeError:
            return value
    return value


def _same(value: Any, inert: Any) -> bool:
    if isinstance(value, bool) or isinstance(inert, bool):
        return value is inert
    if isinstance(value, int | float) and isinstance(inert, int | float):
        return float(value) == float(inert)
    return value == inert


def _parse_inert(cell: str) -> tuple[Any, ...] | None:
    if not cell:
        return None
    return tuple(ANY_VALUE if part == ANY_VALUE else json.loads(part) for part in cell.split("|"))


@cache
def compatibility_table() -> tuple[KeyStatus, ...]:
    """Every row, in the file's order (scope, then key)."""
    text = resources.files("raytuner.config.data").joinpath(TABLE_FILE).read_text(encoding="utf-8")
    lines = text.splitlines()
    header = lines[0].split("\t")
    if header != ["key", "scope", "status", "inert", "test", "note"]:
        raise ValueError(f"{TABLE_FILE}: unexpected header {header}")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        key, scope, status, inert, test, note = line.split("\t")
        if scope not in SCOPES or status not in STATUSES:
            raise ValueError(f"{TABLE_FILE}:{number}: bad scope {scope!r} or status {status!r}")
        rows.append(
            KeyStatus(
                key=key,
                scope=scope,
                status=status,
                note=note,
                test=test,
                inert=_parse_inert(inert),
            )
        )
    return tuple(rows)


@cache
def _by_scope() -> dict[Scope, dict[str, KeyStatus]]:
    table: dict[Scope, dict[str, KeyStatus]] = {scope: {} for scope in SCOPES}
    for row in compatibility_table():
        table[row.scope][row.key] = row
    return table


def key_status(key: str, scope: Scope) -> KeyStatus | None:
    """The row for ``key`` in ``scope``; raytuner's own ``ray_*`` keys live in ``config.json``."""
    rows = _by_scope()
    if scope == "config":
        return rows["config"].get(key) or rows["raytuner"].get(key)
    return rows[scope].get(key)


def keys_in(scope: Scope) -> frozenset[str]:
    """The keys a file of ``scope`` may hold (``config`` includes raytuner's own keys)."""
    rows = _by_scope()
    if scope == "config":
        return frozenset(rows["config"]) | frozenset(rows["raytuner"])
    return frozenset(rows[scope])


def status_counts(scope: Scope | None = None) -> Counter[str]:
    return Counter(row.status for row in compatibility_table() if scope is None or row.scope == scope)


def honoured_share(scope: Scope = "config") -> float:
    """The fraction of ``scope``'s keys raytuner honours end to end."""
    counts = status_counts(scope)
    return counts["honoured"] / sum(counts.values())


# --- rendering ------------------------------------------------------------------------------


def format_tsv() -> str:
    """``key<TAB>scope<TAB>status<TAB>note<TAB>test``, one line per key and scope, for scripts."""
    return "".join(
        f"{row.key}\t{row.scope}\t{row.status}\t{row.note}\t{row.test}\n" for row in compatibility_table()
    )


def summary_line(scope: Scope | None = None) -> str:
    counts = status_counts(scope)
    return ", ".join(f"{counts[status]} {status}" for status in STATUSES)


def format_text() -> str:
    """The table for people: per scope, keys grouped by status."""
    lines = []
    for scope in SCOPES:
        rows = [row for row in compatibility_table() if row.scope == scope]
        lines.append(f"{scope} keys ({len(rows)}): {summary_line(scope)}")
        for status in STATUSES:
            chosen = [row for row in rows if row.status == status]
            if not chosen:
                continue
            lines.append(f"  {status}:")
            width = max(len(row.key) for row in chosen)
            lines += [f"    {row.key:<{width}}  {row.note}" for row in chosen]
        lines.append("")
    return "\n".join(lines)


_SCOPE_TITLES = {
    "config": "`config.json` options",
    "dataset": "`multidatabackend.json` dataset keys",
    "lycoris": "`lycoris_config.json` keys",
    "raytuner": "raytuner's own keys (`config.json`)",
}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def format_markdown() -> str:
    """``docs/simpletuner-compatibility.md``, generated from the table."""
    config_counts = status_counts("config")
    lines = [
        "# SimpleTuner compatibility",
        "",
        "<!-- Generated by `raytuner check-config --keys --format markdown` from "
        "raytuner/config/data/compatibility.tsv; do not edit by hand (`make docs` rewrites it). -->",
        "",
        "What raytuner does with every key a SimpleTuner user's `config.json`, `multidatabackend.json` "
        "and `lycoris_config.json` may hold. Each key has one status:",
        "",
        "- **honoured**: implemented end to end; the test named beside it shows the key changes what "
        "raytuner does.",
        "- **alias**: an older or alternative spelling, mapped the way SimpleTuner maps it.",
        "- **not-yet-supported**: accepted with a warning naming it, because the run will not do what it "
        "asks; `raytuner check-config --strict` makes these an error. Setting one to a value that asks "
        "for nothing (a feature switch left off) is silent.",
        "- **not-applicable**: meaningless on raytuner; the warning says what replaces it (a switch left "
        "off, or a value that asks for nothing raytuner does not already do, is silent).",
        "",
        "Any other key is unknown. One that is a near miss of a known key (`learning-rate`, "
        "`lerning_rate` for `learning_rate`) is an error naming the key meant, since the run would "
        "otherwise use that option's default; any other is a warning naming the closest known key (an "
        "error under `--strict`). A key written both with and without `--` (`learning_rate`, "
        "`--learning_rate`) keeps the later value with a warning, as SimpleTuner's argparse does. An "
        "unsupported `model_family` is reported alone, before any other key is checked.",
        "",
        "The options may come from `config.json`, `config.toml` (its top-level keys) or `config.env` "
        "(SimpleTuner's variables, `LEARNING_RATE` for `learning_rate` and so on, then the words of "
        "`TRAINER_EXTRA_ARGS`; `true` turns a switch on, `false` passes nothing so the option keeps "
        "its default, as in SimpleTuner; a `config/<env>/config.env` is read over `config/config.env`). "
        "Without `--config`, the file is found as SimpleTuner finds it: `config/config.env` is sourced "
        "first; `SIMPLETUNER_ENVIRONMENT`, `SIMPLETUNER_ENV` or `ENV` names an environment "
        "(`config/<env>/`); `SIMPLETUNER_CONFIG_BACKEND`, `CONFIG_BACKEND` or `CONFIG_TYPE` picks the "
        "format, else the first of `config.json`, `config.toml`, `config.env` there; `CONFIG_PATH` "
        "names the file or its folder (raytuner honours it for every format, SimpleTuner's own TOML "
        "and env readers only look in `config/`). Unlike SimpleTuner, a `config.env` option is read "
        "from the file only, never from a variable already in the environment. As in SimpleTuner, "
        "`{env:NAME}` in an option's value is the environment variable (empty when unset).",
        "",
        f"Config options honoured: **{config_counts['honoured']} of {sum(config_counts.values())}** "
        f"({honoured_share('config'):.1%}).",
        "",
        "| scope | " + " | ".join(STATUSES) + " | total |",
        "| --- | " + " | ".join("---:" for _ in STATUSES) + " | ---: |",
    ]
    for scope in SCOPES:
        counts = status_counts(scope)
        lines.append(
            f"| {scope} | "
            + " | ".join(str(counts[status]) for status in STATUSES)
            + f" | {sum(counts.values())} |"
        )
    for scope in SCOPES:
        lines += [
            "",
            f"## {_SCOPE_TITLES[scope]}",
            "",
            "| key | status | note | test |",
            "| --- | --- | --- | --- |",
        ]
        for row in compatibility_table():
            if row.scope == scope:
                test = ", ".join(f"`{name}`" for name in row.tests)
                lines.append(f"| `{row.key}` | {row.status} | {_cell(row.note)} | {_cell(test)} |")
    return "\n".join(lines) + "\n"
