"""The ``Penalty`` base class: a penalty declares sufficient statistics (sums over positions) and a value.

A penalty is split in two, the way a torchmetrics ``Metric`` declares states with a reduction:

* :meth:`Penalty.statistics` maps the kept positions ``x`` of one shard (a ``[m, d]`` matrix) to a
  dict of *sums over positions* -- a count, per-unit sums, a Gram matrix, ... Sums of disjoint
  shards add up, so the statistics of the global batch are one ``all_reduce(SUM)`` away.
* :meth:`Penalty.value` maps (global) statistics to a scalar penalty, differentiably.

Notation in the formulas: ``x`` is ``[m, d]`` (``m`` kept positions of the whole global batch, ``d``
features), ``n = m`` the count of positions, ``mu_j = sum_i x_ij / n``.

Writing your own penalty takes a few lines::

    class MeanTarget(actreg.Penalty):
        '''weight * sum_j (mean_i x_ij - target)^2'''

        def __init__(self, weight: float, target: float = 0.0) -> None:
            self.weight, self.target = weight, target

        def statistic_shapes(self, d):
            return {"sum": (d,), "count": ()}

        def statistics(self, x):
            return {"sum": x.sum(0), "count": count_of(x)}

        def value(self, s):
            mean = s["sum"] / nonzero(s["count"])
            return self.weight * ((mean - self.target) ** 2).sum() * (s["count"] > 0)

Every penalty must give ``0`` (with zero gradient, never NaN) when the count is zero.

Built-in penalties check their parameters when they are constructed (:func:`real_parameter`,
:func:`int_parameter`): a wrong type (a bool, a string, a tensor, a float where an ``int`` is
meant) is a ``TypeError``; a value outside its range (a NaN or infinite weight, a negative one, a
probability outside ``(0, 1)``) is a ``ValueError``. Both messages name the penalty, the parameter,
its value and the rule.
"""

from __future__ import annotations

import abc
import math
import numbers
import operator
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from .positions import position_mask, positions

Shapes = dict[str, tuple[int, ...]]
Stats = Mapping[str, Tensor]

#: Key that :class:`~actreg.ActivityRegularizer` adds to the statistics passed to
#: :meth:`Penalty.value`: the number of samples a Bessel correction should use. It equals
#: ``count`` in ``local``/``global`` mode; in ``ema`` mode it is the bias-corrected moving average
#: of the per-step global count (the EMA ``count`` itself is a weighted sum, not a sample size).
BATCH_COUNT = "batch_count"


def _full(x: Tensor, value: float) -> Tensor:
    return torch.full((), float(value), dtype=x.dtype, device=x.device)


def count_of(x: Tensor) -> Tensor:
    """The number of rows of ``x`` as a 0-d tensor of ``x``'s dtype and device."""
    return _full(x, x.shape[0])


def nonzero(n: Tensor) -> Tensor:
    """``n`` where it is positive, else 1: a divisor that never produces inf/NaN."""
    return torch.where(n > 0, n, 1.0)


def _bound(value: float) -> str:
    return f"{value:g}"


def real_parameter(
    penalty: str,
    name: str,
    value: object,
    low: float = 0.0,
    high: float = math.inf,
    *,
    open_low: bool = False,
    open_high: bool = False,
) -> float:
    """``value`` as a float, after checking that it is a finite real number in ``[low, high]``.

    ``open_low``/``open_high`` exclude the bound. A bool is not a number here (``True`` as a
    weight is a bug). Raises ``TypeError`` for a non-number and ``ValueError`` for a value that
    is not finite or lies outside the interval; messages read
    ``"<penalty>: <name> must be <rule>, got <value>"``.
    """
    if math.isinf(high):
        rule = f"a finite number {'>' if open_low else '>='} {_bound(low)}"
    else:
        rule = (
            f"a finite number in {'(' if open_low else '['}{_bound(low)}, {_bound(high)}"
            f"{')' if open_high else ']'}"
        )
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{penalty}: {name} must be {rule}, got {value!r} of type {type(value).__name__}")
    v = float(value)
    below = v <= low if open_low else v < low
    above = v >= high if open_high else v > high
    if not math.isfinite(v) or below or above:
        raise ValueError(f"{penalty}: {name} must be {rule}, got {value!r}")
    return v


def int_parameter(penalty: str, name: str, value: object, low: int | None = None) -> int:
    """``value`` as an int, after checking that it is an integer (not a bool) and ``>= low``.

    Raises ``TypeError`` for a non-integer (``2.0`` included: an integer parameter is counted,
    not measured) and ``ValueError`` for an integer below ``low``.
    """
    rule = "an integer" if low is None else f"an integer >= {low}"
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"{penalty}: {name} must be {rule}, got {value!r} of type {type(value).__name__}"
        ) from None
    if low is not None and v < low:
        raise ValueError(f"{penalty}: {name} must be {rule}, got {v}")
    return v


def _per_unit(n: Tensor) -> Tensor:
    """A count (``()`` or batched ``[k]``) shaped to divide per-unit statistics ``[..., d]``."""
    return n.unsqueeze(-1)


def _masked(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``x`` with masked-out positions set to 0 (padding may hold -inf or NaN), and the bool mask.

    Masks select with ``where``, never by indexing: shapes do not depend on data.
    """
    keep = position_mask(x, mask)
    if keep is None:
        return x, None
    return torch.where(keep.unsqueeze(-1), x, 0.0), keep


class Penalty(abc.ABC):
    """Base class of activity penalties.

    Subclasses set their hyperparameters as attributes in ``__init__`` (they appear in ``repr``
    and in the layout fingerprint that all ranks must agree on) and implement
    :meth:`statistic_shapes`, :meth:`statistics` and :meth:`value`. Penalties that need the
    structure of the activation (e.g. a time axis) override :meth:`record` instead of
    :meth:`statistics`.

    Shift-invariant penalties (variances, covariances) set :attr:`centered` to name their first
    and second moment statistics; they then receive ``x - c`` for a shift ``c`` identical on all
    ranks (see :mod:`actreg.centering`), which keeps float32 moments accurate when
    ``|mean| >> std``. Leave it empty for anything else.
    """

    #: statistic name -> ``"first"`` | ``"square"`` | ``"outer"`` for shift-invariant penalties
    centered: ClassVar[dict[str, str]] = {}
    #: built-ins only: statistic name -> primitive of the fused kernel (:mod:`actreg.statistics`)
    #: that computes it; penalties that leave it empty record through :meth:`record`
    _primitives: ClassVar[dict[str, str]] = {}
    #: built-ins only: ``value`` accepts statistics with a leading batch dimension (one row per
    #: slot) and is linear in the attribute named by ``_scale``, so slots are evaluated together
    _batchable: ClassVar[bool] = False
    _scale: ClassVar[str] = "weight"
    #: statistics no gradient flows through (counts, top-k assignments): read without autograd
    _constant: ClassVar[frozenset[str]] = frozenset({"count", "elements"})

    @property
    def name(self) -> str:
        """Short name used in metric keys, e.g. ``"L1"``."""
        return type(self).__name__

    @abc.abstractmethod
    def statistic_shapes(self, d: int) -> Shapes:
        """Shapes of the statistics for activations with ``d`` features (fixed once ``d`` is)."""

    def statistics(self, x: Tensor) -> dict[str, Tensor]:
        """Sums over the rows of ``x`` (``[m, d]``, already masked, float32 or wider)."""
        raise NotImplementedError(f"{type(self).__name__} must implement statistics() or record()")

    def record(self, x: Tensor, mask: Tensor | None) -> dict[str, Tensor]:
        """Statistics of one activation ``[..., d]``; positions where ``mask`` is False are dropped."""
        return self.statistics(positions(x, mask))

    @abc.abstractmethod
    def value(self, stats: Stats) -> Tensor:
        """The scalar penalty of (global or moving-average) statistics."""

    def check_features(self, d: int) -> None:  # noqa: B027 - optional hook, no-op by default
        """Raise ``ValueError`` if activations with ``d`` features are not valid input."""

    def hyperparameters(self) -> dict[str, Any]:
        return dict(sorted(vars(self).items()))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"
