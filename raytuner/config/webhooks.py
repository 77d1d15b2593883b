"""SimpleTuner's ``webhook_config``: where a run's events are posted, read into typed targets.

``webhook_config`` is what SimpleTuner accepts: a path to a JSON file, the JSON itself as text,
or (in ``config.json``) an inline object or list; a file or text holds one object or a list of
them. Each object is one target:

- ``"webhook_type": "discord"`` with ``webhook_url``: messages as Discord webhook posts,
  validation images attached; ``message_prefix`` starts each message (default: the tracker
  project and run names).
- ``"webhook_type": "raw"`` with ``callback_url``: structured JSON events (SimpleTuner's
  ``lifecycle.stage``, ``training.status``, ``training.checkpoint``, ``training.validation``,
  ``notification``).

Both take ``log_level`` (critical, error, warning, info, debug; a message is sent when its level
is at or above it), ``auth_token`` (sent as the ``X-API-Key`` header) and ``ssl_no_verify``.
SimpleTuner ignores unknown keys and falls back to ``info`` for an unknown level; raytuner
refuses both before any work starts, so a typo never silences a run's notifications.

The URLs are credentials (a Discord webhook URL carries its token): no message here shows one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from raytuner.config.errors import ConfigError
from raytuner.config.fields import build
from raytuner.config.paths import display, find_input_file, input_candidates
from raytuner.config.surface import did_you_mean

WebhookType = Literal["discord", "raw"]
WEBHOOK_TYPES: tuple[str, ...] = get_args(WebhookType)
# SimpleTuner's levels, most severe first; a target with level L receives messages of level <= L.
LogLevel = Literal["critical", "error", "warning", "info", "debug"]
LOG_LEVELS: dict[str, int] = {level: rank for rank, level in enumerate(get_args(LogLevel))}
URL_KEYS: dict[str, str] = {"discord": "webhook_url", "raw": "callback_url"}
KNOWN_KEYS: tuple[str, ...] = (
    "webhook_type",
    "webhook_url",
    "callback_url",
    "message_prefix",
    "log_level",
    "auth_token",
    "ssl_no_verify",
)


@dataclass(frozen=True, kw_only=True)
class WebhookTarget:
    """One place a run's events go; plain data, so it travels to the workers in the job."""

    webhook_type: WebhookType
    url: str = field(repr=False)  # a credential: never shown
    message_prefix: str | None = None
    log_level: LogLevel = "info"
    auth_token: str | None = field(default=None, repr=False)
    ssl_no_verify: bool = False

    def accepts(self, level: str) -> bool:
        return LOG_LEVELS[level] <= LOG_LEVELS[self.log_level]


def read_webhook_config(
    value: str | Mapping[str, Any] | list[Any], *, where: str, named_in: Path
) -> tuple[list[WebhookTarget], Path | None]:
    """The targets of ``webhook_config`` and the file they came from (None when inline).

    Raises ``ConfigError`` with one line per problem; no line holds a URL or token.
    """
    label = f"{where}: 'webhook_config'"
    source: Path | None = None
    parsed: Any
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(("{", "[")):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as error:
                # The position only: the text around it may be a URL.
                raise ConfigError(
                    f"{label} is not valid JSON ({error.msg} at character {error.pos}): fix the text, "
                    "or give the path of a webhook JSON file"
                ) from None
        else:
            source = find_input_file(text, named_in=named_in)
            if source is None:
                tried = ", ".join(str(path) for path in input_candidates(text, named_in=named_in))
                raise ConfigError(
                    f"{label} = {text!r}: expected a webhook JSON file, JSON text or an object (looked at: {tried}); "
                    "fix the path; relative paths are read from the working directory, then from the folder of config.json"
                )
            try:
                parsed = json.loads(source.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                line = f", line {error.lineno}" if isinstance(error, json.JSONDecodeError) else ""
                raise ConfigError(
                    f"{display(source)}: not valid JSON{line}: fix the file (named by 'webhook_config' in {where})"
                ) from None
            label = f"{display(source)}"
    else:
        parsed = value
    entries = [parsed] if isinstance(parsed, Mapping) else parsed
    if not isinstance(entries, list) or not entries:
        raise ConfigError(
            f"{label}: expected a webhook object or a non-empty list of them, got {type(parsed).__name__}; "
            'e.g. {"webhook_type": "discord", "webhook_url": "https://discord.com/api/webhooks/..."}'
        )
    problems: list[str] = []
    targets = []
    for index, entry in enumerate(entries):
        place = f"{label}: webhook {index + 1}" if len(entries) > 1 else label
        target = _read_target(entry, place=place, problems=problems)
        if target is not None:
            targets.append(target)
    if problems:
        raise ConfigError(problems)
    return targets, source


@dataclass(frozen=True, kw_only=True)
class _WebhookEntry:
    """One entry of ``webhook_config`` as written, read by the same field rules as config.json."""

    webhook_type: WebhookType
    webhook_url: str | None = None
    callback_url: str | None = None
    message_prefix: str | None = None
    log_level: LogLevel = "info"
    auth_token: str | None = field(default=None, repr=False)
    ssl_no_verify: bool = False


def _read_target(entry: Any, *, place: str, problems: list[str]) -> WebhookTarget | None:
    if not isinstance(entry, Mapping):
        problems.append(f"{place}: expected an object, got {type(entry).__name__}")
        return None
    before = len(problems)
    for key in entry:
        if key not in KNOWN_KEYS:
            problems.append(
                f"{place}: unknown key '{key}'{did_you_mean(str(key), KNOWN_KEYS)}; "
                f"expected some of: {', '.join(KNOWN_KEYS)}"
            )
    values = dict(entry)
    if isinstance(values.get("log_level"), str):
        values["log_level"] = values["log_level"].lower()  # SimpleTuner reads levels in any case
    if values.get("webhook_type") is None:
        problems.append(f"{place}: 'webhook_type' not set: expected one of: {', '.join(WEBHOOK_TYPES)}")
        return None
    written = build(_WebhookEntry, values, where=place, problems=problems)
    if written is None:
        return None
    kind = written.webhook_type
    url_key = URL_KEYS[kind]
    url = getattr(written, url_key)
    if url is None or not url.strip():
        other = URL_KEYS["raw" if kind == "discord" else "discord"]
        fix = (
            f"; rename '{other}' to '{url_key}' (SimpleTuner reads '{url_key}' for {kind})"
            if other in entry
            else ""
        )
        problems.append(
            f"{place}: '{url_key}' is required for webhook_type {kind!r}: expected an http(s) URL{fix}"
        )
    elif not url.strip().lower().startswith(("http://", "https://")):
        problems.append(
            f"{place}: '{url_key}' is not an http(s) URL: expected https://… (value hidden: a credential)"
        )
    if len(problems) > before:
        return None
    return WebhookTarget(
        webhook_type=kind,
        url=url.strip(),
        message_prefix=written.message_prefix,
        log_level=written.log_level,
        auth_token=written.auth_token or None,
        ssl_no_verify=written.ssl_no_verify,
    )
