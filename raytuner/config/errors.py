"""The error of config loading: every problem is a single line that stands alone."""

from __future__ import annotations

from raytuner.errors import RaytunerError


class ConfigError(RaytunerError, ValueError):
    """A config that cannot be used as written.

    ``problems`` holds one line per problem: file, key, value, what was expected, how to fix.
    ``str()`` is always one line: the first problem, and how many more there are.
    """
