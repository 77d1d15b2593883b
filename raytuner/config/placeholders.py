"""The ``{...}`` placeholders SimpleTuner fills in ``multidatabackend.json`` values.

SimpleTuner fills every string value of every dataset entry, nested lists and objects
included (never the keys), before it reads the entry: ``{model_family}``, ``{output_dir}``,
``{id}`` (the entry's own id as written) and ``{env:NAME}`` (the environment variable, empty
when unset). It leaves any other ``{...}`` as written, so a typo becomes a folder literally
named ``{modelfamily}``; raytuner refuses it instead, naming the placeholder, except in a prompt
(``instance_prompt``), whose braces may be the user's own words.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from raytuner.config.redact import show_value

# The same shape SimpleTuner matches: braces around anything without braces.
_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")
KNOWN_PLACEHOLDERS: tuple[str, ...] = ("{model_family}", "{output_dir}", "{id}", "{env:NAME}")


@dataclass(kw_only=True)
class FilledDatasets:
    """The entries with their placeholders filled, and what was wrong or worth saying."""

    entries: Any
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def fill_dataset_placeholders(
    raw: Any, *, model_family: str, output_dir: str, where: str, environ: Mapping[str, str] | None = None
) -> FilledDatasets:
    """``raw`` (the decoded dataset list) with its placeholders filled; anything else is returned as is."""
    result = FilledDatasets(entries=raw)
    if not isinstance(raw, list):
        return result
    env = os.environ if environ is None else environ
    entries: list[Any] = []
    for index, entry in enumerate(raw):
        if not isinstance(entry, dict):
            entries.append(entry)
            continue
        dataset_id = entry.get("id")
        written_id = "" if dataset_id is None else str(dataset_id)
        place = (
            f"dataset '{written_id}'"
            if isinstance(dataset_id, str) and dataset_id
            else f"dataset #{index + 1}"
        )
        filler = _Filler(
            variables={"model_family": model_family, "output_dir": output_dir, "id": written_id},
            env=env,
            label=f"{where}: {place}",
            result=result,
        )
        entries.append({key: filler.fill(value, key) for key, value in entry.items()})
    result.entries = entries
    return result


@dataclass(kw_only=True)
class _Filler:
    variables: dict[str, str]
    env: Mapping[str, str]
    label: str
    result: FilledDatasets

    def fill(self, value: Any, key: str) -> Any:
        if isinstance(value, str):
            return _PLACEHOLDER.sub(lambda match: self._replace(match, key=key, value=value), value)
        if isinstance(value, list):
            return [self.fill(item, f"{key}[{index}]") for index, item in enumerate(value)]
        if isinstance(value, dict):
            return {name: self.fill(item, f"{key}.{name}") for name, item in value.items()}
        return value

    def _replace(self, match: re.Match[str], *, key: str, value: str) -> str:
        token = match.group(1)
        if token.startswith("env:"):
            name = token[4:]
            if name not in self.env:
                self.result.warnings.append(
                    f"{self.label}: '{key}' = {_shown(key, value)}: environment variable {name} is not set; "
                    "{" + token + "} is filled with '' as SimpleTuner does"
                )
            return self.env.get(name, "")
        if token in self.variables:
            return self.variables[token]
        if _is_text(key):
            return match.group(0)  # words in a prompt, as SimpleTuner leaves them: "a {red} car"
        self.result.problems.append(
            f"{self.label}: '{key}' = {_shown(key, value)}: unknown placeholder {match.group(0)}; "
            f"expected one of {', '.join(KNOWN_PLACEHOLDERS)}; fix its name, or remove the braces"
        )
        return match.group(0)


def fill_env_placeholders(value: Any, *, environ: Mapping[str, str] | None = None) -> Any:
    """``value`` with every ``{env:NAME}`` in its strings (nested ones included) replaced by the
    environment variable, empty when unset: what SimpleTuner does to each config option's value
    (``{"hf_token": "{env:HF_TOKEN}"}``). Other braces are left as written."""
    env = os.environ if environ is None else environ
    if isinstance(value, str):
        return _PLACEHOLDER.sub(
            lambda match: (
                env.get(match.group(1)[4:], "") if match.group(1).startswith("env:") else match.group(0)
            ),
            value,
        )
    if isinstance(value, list):
        return [fill_env_placeholders(item, environ=env) for item in value]
    if isinstance(value, dict):
        return {key: fill_env_placeholders(item, environ=env) for key, item in value.items()}
    return value


def _is_text(key: str) -> bool:
    """A value that is words for the model (``instance_prompt``), not a name or a path."""
    return re.sub(r"\[\d+\]", "", key).rsplit(".", 1)[-1].endswith("prompt")


def _shown(key: str, value: str) -> str:
    """The value as messages show it: a secret (by its innermost key's name) stays hidden."""
    innermost = re.sub(r"\[\d+\]", "", key).rsplit(".", 1)[-1]
    return show_value(innermost, value)
