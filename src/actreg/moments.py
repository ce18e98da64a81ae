"""Moment penalties: DeCov and VICReg's variance and covariance terms.

They are shift-invariant: their first and second moments are taken around a shift common to all
ranks (see :mod:`actreg.centering`), which keeps float32 sums accurate when ``|mean| >> std``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .penalty import BATCH_COUNT, Penalty, Shapes, Stats, _per_unit, count_of, nonzero


def _biased_covariance(stats: Stats) -> Tensor:
    n = nonzero(stats["count"])
    mean = stats["sum"] / _per_unit(n)
    return stats["outer"] / n[..., None, None] - mean.unsqueeze(-1) * mean.unsqueeze(-2)


def _off_diagonal_squares(c: Tensor) -> Tensor:
    """``sum_{i != j} c_ij^2`` over the last two dimensions."""
    return c.square().sum((-2, -1)) - torch.diagonal(c, dim1=-2, dim2=-1).square().sum(-1)


def _bessel(stats: Stats) -> tuple[Tensor, Tensor]:
    """Factor n/(n-1) of the unbiased estimate, and whether it is defined (n > 1)."""
    nb = stats.get(BATCH_COUNT, stats["count"])
    defined = nb > 1
    return torch.where(defined, nb / torch.where(defined, nb - 1, 1.0), 0.0), defined


class DeCov(Penalty):
    """DeCov (Cogswell et al., 2016): ``weight * 0.5 * (||C||_F^2 - ||diag C||^2)``.

    ``C = sum_i x_i x_i^T / n - mu mu^T`` is the biased covariance of the features.
    """

    centered: ClassVar[dict[str, str]] = {"sum": "first", "outer": "outer"}
    _primitives: ClassVar[dict[str, str]] = {"sum": "csum", "outer": "couter", "count": "count"}
    _batchable = True

    def __init__(self, weight: float) -> None:
        self.weight = float(weight)

    def statistic_shapes(self, d: int) -> Shapes:
        return {"sum": (d,), "outer": (d, d), "count": ()}

    def statistics(self, x: Tensor) -> dict[str, Tensor]:
        return {"sum": x.sum(0), "outer": x.T @ x, "count": count_of(x)}

    def value(self, stats: Stats) -> Tensor:
        return self.weight * 0.5 * _off_diagonal_squares(_biased_covariance(stats))


class VarianceFloor(Penalty):
    """VICReg variance term: ``weight * mean_j relu(gamma - sqrt(var_j + eps))``.

    ``var_j`` is the unbiased variance ``(sum_i x_ij^2 - n mu_j^2) / (n - 1)``; with ``n <= 1`` it is
    undefined and the penalty is 0.
    """

    centered: ClassVar[dict[str, str]] = {"sum": "first", "sq_sum": "square"}
    _primitives: ClassVar[dict[str, str]] = {"sum": "csum", "sq_sum": "csq", "count": "count"}
    _batchable = True

    def __init__(self, weight: float, gamma: float = 1.0, eps: float = 1e-4) -> None:
        self.weight = float(weight)
        self.gamma = float(gamma)
        self.eps = float(eps)

    def statistic_shapes(self, d: int) -> Shapes:
        return {"sum": (d,), "sq_sum": (d,), "count": ()}

    def statistics(self, x: Tensor) -> dict[str, Tensor]:
        return {"sum": x.sum(0), "sq_sum": x.pow(2).sum(0), "count": count_of(x)}

    def value(self, stats: Stats) -> Tensor:
        n = _per_unit(nonzero(stats["count"]))
        mean = stats["sum"] / n
        factor, defined = _bessel(stats)
        var = (stats["sq_sum"] / n - mean.square()) * _per_unit(factor)
        hinge = torch.relu(self.gamma - torch.sqrt(var.clamp_min(0) + self.eps)).mean(-1)
        return torch.where(defined, self.weight * hinge, 0.0)


class Covariance(Penalty):
    """VICReg covariance term: ``weight * sum_{i != j} C_ij^2 / d``.

    ``C = (sum_i x_i x_i^T - n mu mu^T) / (n - 1)`` is the unbiased covariance; 0 when ``n <= 1``.
    """

    centered: ClassVar[dict[str, str]] = {"sum": "first", "outer": "outer"}
    _primitives: ClassVar[dict[str, str]] = {"sum": "csum", "outer": "couter", "count": "count"}
    _batchable = True

    def __init__(self, weight: float) -> None:
        self.weight = float(weight)

    def statistic_shapes(self, d: int) -> Shapes:
        return {"sum": (d,), "outer": (d, d), "count": ()}

    def statistics(self, x: Tensor) -> dict[str, Tensor]:
        return {"sum": x.sum(0), "outer": x.T @ x, "count": count_of(x)}

    def value(self, stats: Stats) -> Tensor:
        factor, defined = _bessel(stats)
        cov = _biased_covariance(stats) * factor[..., None, None]
        off = _off_diagonal_squares(cov)
        return torch.where(defined, self.weight * off / cov.shape[-1], 0.0)
