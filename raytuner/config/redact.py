"""Keep credentials out of anything printed, logged or written.

A key is secret when one of its name parts (split on ``_``, ``-``, ``.``) is a credential word
(``token``, ``secret``, ``password`` …), or two adjacent parts spell one (``api_key``,
``access_key``). Whole parts only: ``tokenizer_max_length``, ``aspect_bucket_rounding`` and
``hub_model_id`` are not secrets.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

REDACTED = "***"

_SECRET_PARTS = frozenset(
    {"token", "secret", "password", "passwd", "passphrase", "credential", "credentials"}
)
_SECRET_PAIRS = frozenset(
    {("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"), ("auth", "key")}
)
_SECRET_JOINED = frozenset({"apikey", "accesskey", "privatekey", "authtoken", "hftoken"})
# Whole keys whose values are credentials although no part says so: a Discord webhook URL
# carries its token, and a raw webhook's callback URL may too (SimpleTuner's webhook keys).
_SECRET_KEYS = frozenset({"webhook_url", "callback_url"})
# Keys whose text value may be inline JSON holding secret keys (a path is left as it is).
_JSON_TEXT_KEYS = frozenset({"webhook_config"})


def is_secret_key(name: str) -> bool:
    if name.strip().lstrip("-").lower() in _SECRET_KEYS:
        return True
    parts = [part for part in re.split(r"[_\-.\s]+", name.strip().lstrip("-").lower()) if part]
    if any(part in _SECRET_PARTS or part in _SECRET_JOINED for part in parts):
        return True
    return any(pair in _SECRET_PAIRS for pair in itertools.pairwise(parts))


def redact(value: Any) -> Any:
    """A copy of ``value`` (nested dicts and lists) with every secret key's value replaced by ``***``."""
    if isinstance(value, dict):
        return {key: _redact_item(str(key), item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    return value


def _redact_item(key: str, item: Any) -> Any:
    if is_secret_key(key) and item not in (None, ""):
        return REDACTED
    if key.lstrip("-") in _JSON_TEXT_KEYS and isinstance(item, str) and item.strip().startswith(("{", "[")):
        try:
            return json.dumps(redact(json.loads(item)))
        except json.JSONDecodeError:
            return REDACTED  # unreadable text may still hold a credential
    return redact(item)


def show_value(key: str, value: Any) -> str:
    """How a value appears in a message: Python-style for text, JSON-style otherwise, secrets hidden."""
    if is_secret_key(key) and value not in (None, ""):
        return repr(REDACTED)
    if key.lstrip("-") in _JSON_TEXT_KEYS:
        value = _redact_item(key, value)  # inline webhooks shown with their URLs hidden
    if isinstance(value, str):
        return repr(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
