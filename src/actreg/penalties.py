"""Activity penalties: each one declares sufficient statistics (sums over positions) and a value.

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
"""

from __future__ import annotations

import abc
import math
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


class L1(Penalty):
    """Mean L1 activity: ``weight * sum_ij |x_ij| / n``.

    Equals Keras' ``activity_regularizer=l1(weight)`` for 2-D activations (sum over features,
    mean over positions).
    """

    def __init__(self, weight: float) -> None:
        self.weight = float(weight)

    _primitives: ClassVar[dict[str, str]] = {"abs_sum": "abs_sum", "count": "count"}
    _batchable = True

    def statistic_shapes(self, d: int) -> Shapes:
        return {"abs_sum": (), "count": ()}

    def statistics(self, x: Tensor) -> dict[str, Tensor]:
        return {"abs_sum": x.abs().sum(), "count": count_of(x)}

    def value(self, stats: Stats) -> Tensor:
        return self.weight * stats["abs_sum"] / nonzero(stats["count"])


class L2(Penalty):
    """Mean squared L2 activity: ``weight * sum_ij x_ij^2 / n`` (Keras ``l2`` for 2-D x)."""

    def __init__(self, weight: float) -> None:
        self.weight = float(weight)

    _primitives: ClassVar[dict[str, str]] = {"sq_sum": "sq_sum", "count": "count"}
    _batchable = True

    def statistic_shapes(self, d: int) -> Shapes:
        return {"sq_sum": (), "count": ()}

    def statistics(self, x: Tensor) -> dict[str, Tensor]:
        return {"sq_sum": x.pow(2).sum(), "count": count_of(x)}

    def value(self, stats: Stats) -> Tensor:
        return self.weight * stats["sq_sum"] / nonzero(stats["count"])


class AR(Penalty):
    """Activation regularization (AWD-LSTM): ``alpha * sum_ij x_ij^2 / (n * d)`` = alpha * mean(x^2)."""

    _primitives: ClassVar[dict[str, str]] = {"sq_sum": "sq_sum", "elements": "elements"}
    _batchable = True
    _scale = "alpha"

    def __init__(self, alpha: float) -> None:
        self.alpha = float(alpha)

    def statistic_shapes(self, d: int) -> Shapes:
        return {"sq_sum": (), "elements": ()}

    def statistics(self, x: Tensor) -> dict[str, Tensor]:
        return {"sq_sum": x.pow(2).sum(), "elements": _full(x, x.numel())}

    def value(self, stats: Stats) -> Tensor:
        return self.alpha * stats["sq_sum"] / nonzero(stats["elements"])


class TAR(Penalty):
    """Temporal activation regularization (AWD-LSTM).

    ``beta * mean over elements of (x_t - x_{t-1})^2``, differences taken along ``time_dim`` of the
    activation ``[..., d]``. With a mask, a difference counts only when both of its positions are
    kept. Each recorded call contributes its own differences (no difference across calls).
    """

    _batchable = True
    _scale = "beta"
    _raw_input = True  # record() takes the activation as produced (no float32 copy is kept)

    def __init__(self, beta: float, time_dim: int = 1) -> None:
        self.beta = float(beta)
        self.time_dim = int(time_dim)

    def statistic_shapes(self, d: int) -> Shapes:
        return {"diff_sq_sum": (), "elements": ()}

    def record(self, x: Tensor, mask: Tensor | None) -> dict[str, Tensor]:
        from .statistics import temporal_differences

        if x.dim() < 2:
            raise ValueError(f"TAR needs an activation [..., time, ..., d], got shape {tuple(x.shape)}")
        td = self.time_dim % x.dim()
        if td == x.dim() - 1:
            raise ValueError(
                f"TAR(time_dim={self.time_dim}) points at the feature (last) dimension of an "
                f"activation of shape {tuple(x.shape)}; time_dim must be a position dimension"
            )
        acc = torch.promote_types(x.dtype, torch.float32)
        if x.shape[td] < 2:
            zero = torch.zeros((), dtype=acc, device=x.device)
            return {"diff_sq_sum": zero, "elements": zero}
        sq, n = temporal_differences(x, position_mask(x, mask), td, acc).unbind()
        return {"diff_sq_sum": sq, "elements": n}

    def value(self, stats: Stats) -> Tensor:
        return self.beta * stats["diff_sq_sum"] / nonzero(stats["elements"])


class KLSparsity(Penalty):
    """KL sparsity target of sparse autoencoders.

    ``weight * sum_j KL(target || rho_j)`` with ``rho_j = clamp(mu_j, eps, 1 - eps)`` and
    ``KL(p || q) = p log(p/q) + (1-p) log((1-p)/(1-q))``. Activations are expected in [0, 1]
    (e.g. sigmoid outputs).
    """

    _primitives: ClassVar[dict[str, str]] = {"sum": "sum", "count": "count"}
    _batchable = True

    def __init__(self, target: float, weight: float, eps: float = 1e-6) -> None:
        if not 0.0 < target < 1.0:
            raise ValueError(f"KLSparsity target must lie in (0, 1), got {target}")
        self.target = float(target)
        self.weight = float(weight)
        self.eps = float(eps)

    def statistic_shapes(self, d: int) -> Shapes:
        return {"sum": (d,), "count": ()}

    def statistics(self, x: Tensor) -> dict[str, Tensor]:
        return {"sum": x.sum(0), "count": count_of(x)}

    def value(self, stats: Stats) -> Tensor:
        n = stats["count"]
        rho_hat = (stats["sum"] / _per_unit(nonzero(n))).clamp(self.eps, 1.0 - self.eps)
        p = self.target
        kl = p * (math.log(p) - torch.log(rho_hat)) + (1 - p) * (math.log(1 - p) - torch.log1p(-rho_hat))
        return torch.where(n > 0, self.weight * kl.sum(-1), 0.0)


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


class LoadBalance(Penalty):
    """Switch/GShard load-balancing loss on router logits ``[..., num_experts]``.

    ``weight * E * sum_e f_e P_e`` with ``f_e = (top-k assignments to e) / (n k)`` (not
    differentiable) and ``P_e = sum_i softmax(x_i)_e / n``.
    """

    _batchable = True
    _constant: ClassVar[frozenset[str]] = frozenset({"count", "assigned"})

    def __init__(self, num_experts: int, top_k: int, weight: float) -> None:
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"LoadBalance needs 1 <= top_k <= num_experts, got {top_k}, {num_experts}")
        self.num_experts = int(num_experts)
        self.top_k = int(top_k)
        self.weight = float(weight)

    def check_features(self, d: int) -> None:
        if d != self.num_experts:
            raise ValueError(
                f"LoadBalance(num_experts={self.num_experts}) got router logits with {d} features"
            )

    def statistic_shapes(self, d: int) -> Shapes:
        return {"assigned": (d,), "prob_sum": (d,), "count": ()}

    def statistics(self, x: Tensor) -> dict[str, Tensor]:
        return self.record(x, None)

    def record(self, x: Tensor, mask: Tensor | None) -> dict[str, Tensor]:
        x, keep = _masked(x, mask)
        lead = tuple(range(x.dim() - 1))
        probs = torch.softmax(x, dim=-1)
        chosen = torch.topk(x.detach(), self.top_k, dim=-1).indices
        votes = torch.ones_like(chosen, dtype=x.dtype)
        if keep is not None:
            probs = torch.where(keep.unsqueeze(-1), probs, 0.0)
            votes = votes * keep.unsqueeze(-1)
        assigned = torch.zeros(x.shape[-1], dtype=x.dtype, device=x.device)
        assigned.index_add_(0, chosen.reshape(-1), votes.reshape(-1))
        count = _full(x, x.numel() // x.shape[-1]) if keep is None else keep.sum(dtype=x.dtype)
        return {"assigned": assigned, "prob_sum": probs.sum(lead), "count": count}

    def value(self, stats: Stats) -> Tensor:
        n = _per_unit(nonzero(stats["count"]))
        f = stats["assigned"] / (n * self.top_k)
        p = stats["prob_sum"] / n
        return self.weight * self.num_experts * (f * p).sum(-1)


class ZLoss(Penalty):
    """Router z-loss (ST-MoE): ``weight * sum_i logsumexp(x_i)^2 / n`` on router logits."""

    _batchable = True

    def __init__(self, weight: float) -> None:
        self.weight = float(weight)

    def statistic_shapes(self, d: int) -> Shapes:
        return {"lse_sq_sum": (), "count": ()}

    def statistics(self, x: Tensor) -> dict[str, Tensor]:
        return self.record(x, None)

    def record(self, x: Tensor, mask: Tensor | None) -> dict[str, Tensor]:
        x, keep = _masked(x, mask)
        lse_sq = torch.logsumexp(x, dim=-1).square()
        if keep is None:
            return {"lse_sq_sum": lse_sq.sum(), "count": _full(x, lse_sq.numel())}
        return {"lse_sq_sum": torch.where(keep, lse_sq, 0.0).sum(), "count": keep.sum(dtype=x.dtype)}

    def value(self, stats: Stats) -> Tensor:
        return self.weight * stats["lse_sq_sum"] / nonzero(stats["count"])
