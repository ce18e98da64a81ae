"""Exceptions raised by actreg. Each one is raised on *every* rank of the process group."""

from __future__ import annotations


class ActregError(RuntimeError):
    """Base class of actreg's errors."""


class LayoutMismatchError(ActregError):
    """Ranks built different regularizers (patterns, penalties, modes or feature sizes)."""


class RecordingError(ActregError):
    """Recording an activation failed on some rank (bad shape, mask, feature size, ...)."""


class NonFiniteStatisticError(ActregError):
    """A global statistic is NaN or infinite."""
