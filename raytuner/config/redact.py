"""Keep credentials out of anything printed, logged or written.

A key is secret when one of its name parts (split on ``_``, ``-``, ``.``) is a credential word
(``token``, ``secret``, ``password`` …), or two adjacent parts spell one (``api_key``,
``access_key``). Whole parts only: ``tokenizer_max_length``, ``aspect_bucket_rounding`` and
``hub_model_id`` are not secrets.
"""

from __future__ import annotations

import itertools
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


def is_secret_key(name: str) -> bool:
    parts = [part for part in re.split(r"[_\-.\s]+", name.strip().lstrip("-").lower()) if part]
    if any(part in _SECRET_PARTS or part in _SECRET_JOINED for part in parts):
        return True
    return any(pair in _SECRET_PAIRS for pair in itertools.pairwise(parts))


def redact(value: Any) -> Any:
    """A copy of ``value`` (nested dicts and lists) with every secret key's value replaced by ``***``."""
    if isinstance(value, dict):
        return {
            key: (REDACTED if is_secret_key(str(key)) and item not in (None, "") else redact(item))
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    return value


def show_value(key: str, value: Any) -> str:
    """How a value appears in a message: Python-style for text, JSON-style otherwise, secrets hidden."""
    if is_secret_key(key) and value not in (None, ""):
        return repr(REDACTED)
    if isinstance(value, str):
        return repr(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
