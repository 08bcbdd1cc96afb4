"""The one base of every error cytopipe reports to a user as a one-line message.

The CLI catches `CytopipeError` and prints it; anything else is a bug and keeps its traceback.
Subclasses stay where their module raises them, and keep their historical builtin base
(ValueError / RuntimeError) so that callers catching those still work.
"""

from __future__ import annotations


class CytopipeError(Exception):
    """An expected failure with a message written for the user (file and reason in one line)."""


def one_line(exc: BaseException) -> str:
    """`Type: first line of the message` (the type alone for an empty message): an unexpected error as one
    row of a batch's report."""
    first = (str(exc).splitlines() or [""])[0].strip()
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
