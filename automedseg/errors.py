"""Errors that mean "the input is wrong", as opposed to a bug.

The CLI prints an :class:`InputError` as its message alone (one line per problem, naming the file or option),
exits with status 2 and writes nothing more. Library callers catch it like any ``ValueError``.

Example:
    >>> str(InputError("plans.json: spacing_mm must be positive"))
    'plans.json: spacing_mm must be positive'
"""

from __future__ import annotations

from collections.abc import Sequence


class InputError(ValueError):
    """A file, folder or option cannot be used; the message says which and why."""


class DatasetError(InputError):
    """A dataset folder cannot be used; ``problems`` holds one line per problem found."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class LockedError(InputError):
    """Another process holds the folder this one wants to write."""
