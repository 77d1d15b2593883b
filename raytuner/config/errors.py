"""The one error type of config loading: every problem is a single line that stands alone."""

from __future__ import annotations

from collections.abc import Sequence


class ConfigError(ValueError):
    """A config that cannot be used as written.

    ``problems`` holds one line per problem: file, key, value, what was expected, how to fix.
    ``str()`` is always one line: the first problem, and how many more there are.
    """

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems: tuple[str, ...] = (problems,) if isinstance(problems, str) else tuple(problems)
        if not self.problems:
            raise ValueError("ConfigError needs at least one problem")
        super().__init__(self.problems[0])

    def __str__(self) -> str:
        first = self.problems[0]
        more = len(self.problems) - 1
        return first if more == 0 else f"{first} (and {more} more problem{'s' if more > 1 else ''})"
