"""What ``raytuner check-config`` prints: the resolved run, and the compatibility table.

The command itself is :func:`raytuner.train.preflight.check_config_main`: it runs the pre-flight
check that ``raytuner train`` runs.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from raytuner.config.compatibility import format_markdown, format_text, format_tsv
from raytuner.config.run import RunConfig

EXIT_OK = 0


def format_run(run: RunConfig) -> str:
    """The resolved files, warnings, notes and config (credentials redacted), for people."""
    lines = ["files:"]
    width = max(len(role) for role in run.sources)
    lines += [f"  {role:<{width}}  {path}" for role, path in run.sources.items()]
    if run.warnings:
        lines.append("warnings:")
        lines += [f"  warning: {message}" for message in run.warnings]
    if run.notes:
        lines.append("notes:")
        lines += [f"  note: {message}" for message in run.notes]
    resolved = run.to_dict(redact=True)
    for key in ("sources", "warnings", "notes"):
        resolved.pop(key)
    lines.append("resolved config:")
    lines.append(json.dumps(resolved, indent=2))
    return "\n".join(lines)


@contextmanager
def quiet_config_logging() -> Iterator[None]:
    """Silence the config loader's own warning log (for callers that report ``run.warnings`` themselves)."""
    config_logger = logging.getLogger("raytuner.config")
    previous = config_logger.level
    config_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        config_logger.setLevel(previous)


def print_keys(output_format: str = "text") -> int:
    """Print the compatibility table (``text``, ``tsv`` or ``markdown``) on stdout."""
    render = {"text": format_text, "tsv": format_tsv, "markdown": format_markdown}[output_format]
    sys.stdout.write(render())
    return EXIT_OK
