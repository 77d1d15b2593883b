"""SimpleTuner's configuration surface, read from the lists shipped in ``raytuner/config/data/``.

These lists say what a SimpleTuner user's files may contain. raytuner uses them to tell a
key it has not implemented yet ("accepted, not yet supported") from a typo (did-you-mean),
and to take SimpleTuner's defaults and choices instead of retyping them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from importlib import resources

_DATA_PACKAGE = "raytuner.config.data"


def _read_lines(name: str) -> list[str]:
    text = resources.files(_DATA_PACKAGE).joinpath(name).read_text(encoding="utf-8")
    return text.splitlines()


@cache
def config_keys() -> frozenset[str]:
    """Every name SimpleTuner accepts in ``config.json`` (options and their aliases)."""
    return frozenset(line.strip() for line in _read_lines("config_keys.txt") if line.strip())


@cache
def dataset_keys() -> frozenset[str]:
    """Every top-level key SimpleTuner reads from a ``multidatabackend.json`` entry."""
    keys: set[str] = set()
    section = ""
    for line in _read_lines("dataset_keys.txt"):
        stripped = line.strip()
        if stripped.startswith("#"):
            section = stripped
            continue
        # Nested block keys ("video.num_frames") live inside their block; internal markers are
        # written by SimpleTuner itself, not by users.
        if stripped and "." not in stripped and "internal markers" not in section:
            keys.add(stripped)
    return frozenset(keys)


@dataclass(frozen=True, kw_only=True)
class OptionSpec:
    """Type, default and choices of one SimpleTuner option, as listed in ``config_keys.tsv``."""

    name: str
    type: str
    default: str
    choices: tuple[str, ...]


@cache
def option_specs() -> dict[str, OptionSpec]:
    specs: dict[str, OptionSpec] = {}
    for line in _read_lines("config_keys.tsv")[1:]:
        if not line.strip():
            continue
        name, type_name, default, choices = ([*line.split("\t"), "", "", ""])[:4]
        specs[name] = OptionSpec(name=name, type=type_name, default=default, choices=_parse_choices(choices))
    return specs


def _parse_choices(text: str) -> tuple[str, ...]:
    # Options whose choices argparse does not enforce list them as
    # "(not enforced by argparse; registry lists: a,b,c)".
    if "registry lists:" in text:
        text = text.split("registry lists:", 1)[1].rstrip(")")
    return tuple(choice.strip() for choice in text.split(",") if choice.strip())


def option_choices(name: str) -> tuple[str, ...]:
    return option_specs()[name].choices


@dataclass(frozen=True, kw_only=True)
class KeyAlias:
    """One old or alternative spelling that SimpleTuner maps onto another option."""

    accepted: str
    maps_to: str | None  # None: SimpleTuner drops the key
    inverted: bool
    reason: str


@cache
def key_aliases() -> dict[str, KeyAlias]:
    """Config-file key aliases, as SimpleTuner maps them (``config_key_aliases.tsv``)."""
    aliases: dict[str, KeyAlias] = {}
    for line in _read_lines("config_key_aliases.tsv")[1:]:
        if not line.strip():
            continue
        accepted, maps_to, _mechanism = line.split("\t")
        if accepted.startswith("lr_scheduler value "):
            continue  # a value alias, see value_aliases()
        if maps_to.startswith("(dropped"):
            aliases[accepted] = KeyAlias(
                accepted=accepted, maps_to=None, inverted=False, reason=maps_to.strip("()")
            )
            continue
        target = maps_to.split()[0]
        inverted = "(inverted)" in maps_to or "when value is false" in maps_to
        aliases.setdefault(
            accepted, KeyAlias(accepted=accepted, maps_to=target, inverted=inverted, reason="")
        )
    return aliases


@cache
def value_aliases() -> dict[str, dict[str, str]]:
    """Per-option value aliases, e.g. ``lr_scheduler: cosine_with_warmup -> cosine``."""
    result: dict[str, dict[str, str]] = {}
    for line in _read_lines("config_key_aliases.tsv")[1:]:
        accepted, maps_to, *_ = ([*line.split("\t"), ""])[:3]
        if " value " in accepted:
            option, value = accepted.split(" value ", 1)
            result.setdefault(option.strip(), {})[value.strip()] = maps_to.strip()
    return result


@dataclass(frozen=True, kw_only=True)
class Flavour:
    family: str
    name: str
    hub_id: str
    default: bool


@cache
def _families_sections() -> tuple[frozenset[str], frozenset[str], tuple[Flavour, ...]]:
    metadata_keys: set[str] = set()
    registered: set[str] = set()
    flavours: list[Flavour] = []
    section = ""
    for line in _read_lines("families.txt"):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("# [A] argparse"):
            section = "A"
        elif stripped.startswith("# [B] names registered"):
            section = "B"
        elif stripped.startswith("# model_flavour"):
            section = "flavours"
        elif stripped.startswith("#") or stripped.startswith("family\t"):
            continue
        elif section == "A":
            metadata_keys.add(stripped)
        elif section == "B":
            registered.add(stripped)
        elif section == "flavours":
            family_cell, flavour, hub_id, default = line.split("\t")
            flavours.append(
                Flavour(family=family_cell.split()[0], name=flavour, hub_id=hub_id, default=default == "yes")
            )
    return frozenset(metadata_keys), frozenset(registered), tuple(flavours)


def simpletuner_families() -> frozenset[str]:
    """Every ``model_family`` name SimpleTuner knows: its metadata keys and its registered names."""
    metadata_keys, registered, _ = _families_sections()
    return metadata_keys | registered


def flavours(family: str) -> tuple[Flavour, ...]:
    return tuple(flavour for flavour in _families_sections()[2] if flavour.family == family)


# How alike two names must be (difflib's ratio) for one to be read as a misspelling of the other:
# ``learning-rate`` or ``lerning_rate`` for ``learning_rate``, not ``validation_seed`` for ``seed``.
NEAR_MISS = 0.85


def closest(name: str, candidates: Iterable[str], *, cutoff: float = 0.6) -> str | None:
    """The candidate most like ``name`` (for did-you-mean), or None when nothing is close."""
    matches = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=cutoff)
    return matches[0] if matches else None


def near_miss(name: str, candidates: Iterable[str]) -> str | None:
    """The known name ``name`` is a misspelling of (dashes for underscores, a letter off), or None."""
    known = set(candidates)
    respelt = name.strip("-").replace("-", "_").lower()
    if respelt in known and respelt != name:
        return respelt
    return closest(name, known, cutoff=NEAR_MISS)


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` or an empty string."""
    match = closest(name, candidates)
    return f" (did you mean '{match}'?)" if match else ""
