"""Model family registry: one name, one class; duplicates refused, unknown names listed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raytuner.errors import RaytunerError

if TYPE_CHECKING:
    from raytuner.models.base import ModelFamily

_FAMILIES: dict[str, type[ModelFamily]] = {}


class UnknownModelFamilyError(RaytunerError, ValueError):
    """Raised for a model_family raytuner has no implementation of."""


def register_family(family: type[ModelFamily]) -> type[ModelFamily]:
    """Class decorator adding a family under its ``name``."""
    if family.name in _FAMILIES:
        raise ValueError(
            f"model family {family.name!r} is already registered by {_FAMILIES[family.name].__name__}"
        )
    _FAMILIES[family.name] = family
    return family


def _ensure_builtin_families_loaded() -> None:
    # Importing the family modules runs their @register_family decorators.
    from raytuner.models import cosmos2image, omnigen  # noqa: F401


def known_families() -> list[str]:
    _ensure_builtin_families_loaded()
    return sorted(_FAMILIES)


def family_aliases() -> dict[str, str]:
    """Other ``model_family`` values that name a registered family -> that family's name."""
    _ensure_builtin_families_loaded()
    return {alias: family.name for family in _FAMILIES.values() for alias in family.aliases}


def get_family(name: str) -> type[ModelFamily]:
    _ensure_builtin_families_loaded()
    try:
        return _FAMILIES[name]
    except KeyError:
        raise UnknownModelFamilyError(
            f"unknown model_family {name!r} (known: {', '.join(sorted(_FAMILIES))})"
        ) from None
