"""``raytuner check-config``: load a config, run the pre-flight checks, print the outcome.

``check_config_main`` loads the files, prints what was resolved (credentials
redacted) and the warnings, or the errors, one ``error: …`` line each on stderr.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from raytuner.config.compatibility import format_markdown, format_text, format_tsv
from raytuner.config.errors import ConfigError
from raytuner.config.loader import load_config
from raytuner.config.paths import display
from raytuner.config.preflight import check_run
from raytuner.config.run import RunConfig

EXIT_OK = 0
EXIT_BAD_CONFIG = 2


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


def check_config_main(config_path: str, *, strict: bool = False) -> int:
    """Load and check a config; print the result. 0 when usable, 2 when not."""
    try:
        with quiet_config_logging():
            run = load_config(config_path, strict=strict)
    except ConfigError as error:
        for line in error.problems:
            print(f"error: {line}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    print(format_run(run))
    errors = check_run(run)
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    if errors:
        return EXIT_BAD_CONFIG
    print(f"ok: {display(run.sources['config'])}")
    return EXIT_OK


def print_keys(output_format: str = "text") -> int:
    """Print the compatibility table (``text``, ``tsv`` or ``markdown``) on stdout."""
    render = {"text": format_text, "tsv": format_tsv, "markdown": format_markdown}[output_format]
    sys.stdout.write(render())
    return EXIT_OK
