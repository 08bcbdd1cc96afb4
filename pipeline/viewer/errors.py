"""The viewer's user-facing error."""

from __future__ import annotations

from pipeline.errors import CytopipeError


class ViewerError(CytopipeError, ValueError):
    """A report folder, slide or port the viewer cannot use (one line: what and why)."""
