"""raytuner's one error type: what the user can fix, one line per problem.

Every error a user is expected to meet — a bad config, a missing folder, a cache written by
another encoder, a token the Hub refuses — is a :class:`RaytunerError` (each module keeps its own
subclass, ``ConfigError``, ``CacheError``, …, so callers can still tell them apart). The
``raytuner`` command prints its problems as ``error:`` lines and exits 2; any other exception is a
bug and is reported as one (raytuner/cli.py).

This module imports nothing heavy: every part of raytuner derives its errors from it, and Ray
unpickles them on the driver.
"""

from __future__ import annotations

from collections.abc import Sequence


class RaytunerError(Exception):
    """A run, command or file that cannot be used as it is, stated so the user can fix it.

    ``problems`` holds one line per problem: what is wrong (file, key, value, folder), what was
    expected and how to fix it. ``str()`` is always one line: the first problem, and how many
    more there are.
    """

    # An instance attribute only: Ray's wrapper of a task's error (a subclass of both RayTaskError
    # and this class) finds it on the original error through its __getattr__.
    problems: tuple[str, ...]

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems = (problems,) if isinstance(problems, str) else tuple(problems)
        if not self.problems:
            raise ValueError(f"{type(self).__name__} needs at least one problem")
        # ``args`` is the first line alone, as for any exception made from a message: pickling
        # (Ray sends a worker's error to the driver) calls the class with ``args`` and then
        # restores ``problems`` whole from the instance's ``__dict__``.
        super().__init__(self.problems[0])

    def __str__(self) -> str:
        first = self.problems[0]
        more = len(self.problems) - 1
        return first if more == 0 else f"{first} (and {more} more problem{'s' if more > 1 else ''})"


def find_error(error: BaseException) -> RaytunerError | None:
    """The :class:`RaytunerError` that ``error`` is or carries, as it was raised; None if there is none.

    Ray hands a task's or actor's exception to the driver wrapped: ``RayTaskError.cause`` holds
    the original, and the wrapper Ray raises may subclass both ``RayTaskError`` and the original's
    type, with a multi-line traceback for ``str()`` — so the original is taken from ``cause``
    before the wrapper's own type is looked at. Ray Data and Ray Train raise their own exceptions
    from it, so ``__cause__`` and ``__context__`` are followed too.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        cause = getattr(current, "cause", None)  # RayTaskError, and Ray's dual-typed copy of it
        if isinstance(cause, BaseException) and id(cause) not in seen:
            current = cause
            continue
        if isinstance(current, RaytunerError):
            return current
        current = current.__cause__ or current.__context__
    return None
