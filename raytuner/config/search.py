"""Finding the config file when no ``--config`` names one, as SimpleTuner finds it.

SimpleTuner first sources ``config/config.env`` (then ``config/<env>/config.env``) into its
environment, so those files can choose the rest. Then:

* the environment: ``SIMPLETUNER_ENVIRONMENT``, else ``SIMPLETUNER_ENV``, else ``ENV``
  (``default`` is none);
* the format: ``SIMPLETUNER_CONFIG_BACKEND``, else ``CONFIG_BACKEND``, else ``CONFIG_TYPE``
  (json, toml or env); unset, the first of config.json, config.toml, config.env found in
  ``config/`` (``config/<env>/`` with an environment), else json;
* the file: ``CONFIG_PATH`` first (a folder holding the file, or the file, its suffix optional);
  then, with an environment, ``<env>/config.json`` and ``config/<env>/config.json`` (an
  environment with a suffix names the file itself), ``config/<env>/config.toml`` or
  ``config/<env>/config.env``; without one, ``config/config.json`` (``.toml``, ``.env``).

SimpleTuner's TOML and env readers look only in ``config/`` and ``config/<env>/``; raytuner
also honours ``CONFIG_PATH`` for them, as ``simpletuner train`` sets it for every format.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from raytuner.config.errors import ConfigError
from raytuner.config.formats import FORMAT_FILES, ConfigFormat, parse_env_file, read_text
from raytuner.config.paths import display

ENVIRONMENT_VARIABLES = ("SIMPLETUNER_ENVIRONMENT", "SIMPLETUNER_ENV", "ENV")
BACKEND_VARIABLES = ("SIMPLETUNER_CONFIG_BACKEND", "CONFIG_BACKEND", "CONFIG_TYPE")
CONFIG_FOLDER = Path("config")


@dataclass(frozen=True)
class FoundConfig:
    """The config file a command reads, and why that one."""

    path: Path
    reason: str

    def describe(self) -> str:
        return f"config: {display(self.path)} ({self.reason})"


def find_config(environ: Mapping[str, str] | None = None) -> FoundConfig:
    """The config file SimpleTuner would read from the working directory and ``environ``."""
    variables = dict(os.environ if environ is None else environ)
    _source(CONFIG_FOLDER / FORMAT_FILES["env"], variables)
    env = _first(variables, ENVIRONMENT_VARIABLES)
    if env == "default":
        env = None
    if env is not None:
        _source(CONFIG_FOLDER / env / FORMAT_FILES["env"], variables)
    folder = CONFIG_FOLDER / env if env else CONFIG_FOLDER
    backend_value = _first(variables, BACKEND_VARIABLES)
    if backend_value is not None:
        backend = _backend(backend_value.lower(), variables)
        chosen = f"{_named(variables, BACKEND_VARIABLES)}={backend_value}"
    else:
        backend = next((kind for kind, name in FORMAT_FILES.items() if (folder / name).is_file()), "json")
        chosen = f"the first of config.json, config.toml, config.env in {folder}/"
    override = variables.get("CONFIG_PATH") or None
    candidates = _candidates(backend, env=env, override=override)
    for candidate in candidates:
        if candidate.is_file():
            reasons = [chosen]
            if override is not None:
                reasons.append(f"CONFIG_PATH={override}")
            if env is not None:
                reasons.append(f"{_named(variables, ENVIRONMENT_VARIABLES)}={env}")
            return FoundConfig(candidate.resolve(), "found as SimpleTuner finds it: " + ", ".join(reasons))
    tried = ", ".join(str(candidate) for candidate in candidates)
    raise ConfigError(
        f"no config file found (format {backend}, looked at: {tried}; working directory: {Path.cwd()}); "
        "pass --config, or set CONFIG_PATH or ENV as for SimpleTuner"
    )


def _first(variables: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    for name in names:
        if variables.get(name):
            return variables[name]
    return None


def _named(variables: Mapping[str, str], names: tuple[str, ...]) -> str:
    return next(name for name in names if variables.get(name))


def _source(path: Path, variables: dict[str, str]) -> None:
    """Set the variables a config.env assigns, as SimpleTuner sources it before choosing."""
    if not path.is_file():
        return
    assigned: dict[str, list[str]] = {}
    parse_env_file(read_text(path, "config.env"), where=display(path), into=assigned, warnings=[])
    variables.update({name: " ".join(words) for name, words in assigned.items() if words})


def _backend(value: str, variables: Mapping[str, str]) -> ConfigFormat:
    for kind in FORMAT_FILES:
        if kind == value:
            return kind
    raise ConfigError(
        f"{_named(variables, BACKEND_VARIABLES)}={value!r}: expected json, toml or env; raytuner reads a "
        "config file (SimpleTuner's cmd backend takes options on its own command line)"
    )


def _candidates(backend: ConfigFormat, *, env: str | None, override: str | None) -> list[Path]:
    name = FORMAT_FILES[backend]
    found: list[Path] = []
    if override is not None:
        path = Path(override).expanduser()
        if path.is_dir():
            found.append(path / name)
        else:
            if path.suffix:
                found.append(path)
            found.append(path.with_suffix(Path(name).suffix))
    if env is not None:
        env_path = Path(env).expanduser()
        if env_path.suffix:
            found.append(env_path)
        elif backend == "json":
            found.append(env_path / name)
            if env_path.parts[:1] != ("config",):
                found.append(CONFIG_FOLDER / env_path / name)
        else:
            found.append(CONFIG_FOLDER / env_path / name)
    else:
        found.append(CONFIG_FOLDER / name)
    unique: list[Path] = []
    for path in found:
        if path not in unique:
            unique.append(path)
    return unique
