"""Activity figures of a regularized layer, computed from the same collective as the penalties.

Statistics (sums over kept positions, never differentiated): ``count`` (positions), ``abs_sum``
and ``sq_sum`` over all elements, per unit ``sum`` (its global mean is the next step's shift of
centred penalties) and ``active`` -- the number of positions where ``|x| > threshold``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .penalties import Shapes, Stats, count_of, nonzero


def activity_shapes(d: int) -> Shapes:
    return {"count": (), "abs_sum": (), "sq_sum": (), "sum": (d,), "active": (d,)}


def activity_statistics(x: Tensor, threshold: float) -> dict[str, Tensor]:
    """Activity statistics of rows ``x`` (``[m, d]``); the result carries no autograd graph."""
    x = x.detach()
    magnitude = x.abs()
    return {
        "count": count_of(x),
        "abs_sum": magnitude.sum(),
        "sq_sum": torch.linalg.vecdot(x.reshape(-1), x.reshape(-1)),
        "sum": x.sum(0),
        "active": _active(magnitude, threshold).sum(0),
    }


def _active(magnitude: Tensor, threshold: float) -> Tensor:
    """1.0 where ``magnitude > threshold`` else 0.0 (float arithmetic: ~5x faster than a bool mask)."""
    if threshold == 0.0:
        return magnitude.sign()
    return (magnitude - threshold).relu_().sign_()


def activity_metrics(stats: Stats) -> dict[str, Tensor]:
    """``mean_abs``, ``rms``, ``active_fraction`` (of elements) and ``dead_units`` (units never
    active on any kept position; 0 when nothing was recorded), plus ``count``."""
    n = stats["count"]
    d = stats["active"].numel()
    elements = nonzero(n * d)
    dead = (stats["active"] == 0).sum().to(n.dtype) * (n > 0)
    return {
        "count": n,
        "mean_abs": stats["abs_sum"] / elements,
        "rms": torch.sqrt(stats["sq_sum"] / elements),
        "active_fraction": stats["active"].sum() / elements,
        "dead_units": dead,
    }
