"""The built-in activity penalties (moment penalties -- DeCov, VICReg's terms -- in ``moments``).

Each one declares sufficient statistics (sums over positions) and a value; see
:class:`actreg.penalty.Penalty`. Built-ins also declare which primitives of the fused recording
kernel compute their statistics (``_primitives``) and write ``value`` for statistics with a leading
batch dimension, so that alike penalties of many layers are evaluated together.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor

from .moments import Covariance as Covariance
from .moments import DeCov as DeCov
from .moments import VarianceFloor as VarianceFloor
from .penalty import (
    BATCH_COUNT as BATCH_COUNT,
)
from .penalty import (
    Penalty,
    Shapes,
    Stats,
    _full,
    _masked,
    _per_unit,
    int_parameter,
    real_parameter,
)
from .penalty import (
    count_of as count_of,
)
from .penalty import (
    nonzero as nonzero,
)
from .positions import position_mask


class L1(Penalty):
    """Mean L1 activity: ``weight * sum_ij |x_ij| / n``.

    Equals Keras' ``activity_regularizer=l1(weight)`` for 2-D activations (sum over features,
    mean over positions). ``weight``: a finite number >= 0.
    """

    def __init__(self, weight: float) -> None:
        self.weight = real_parameter(type(self).__name__, "weight", weight)

    _primitives: ClassVar[dict[str, str]] = {"abs_sum": "abs_sum", "count": "count"}
    _batchable = True

    def statistic_shapes(self, d: int) -> Shapes:
        return {"abs_sum": (), "count": ()}

    def statistics(self, x: Tensor) -> dict[str, Tensor]:
        return {"abs_sum": x.abs().sum(), "count": count_of(x)}

    def value(self, stats: Stats) -> Tensor:
        return self.weight * stats["abs_sum"] / nonzero(stats["count"])


class L2(Penalty):
    """Mean squared L2 activity: ``weight * sum_ij x_ij^2 / n`` (Keras ``l2`` for 2-D x).

    ``weight``: a finite number >= 0.
    """

    def __init__(self, weight: float) -> None:
        self.weight = real_parameter(type(self).__name__, "weight", weight)

    _primitives: ClassVar[dict[str, str]] = {"sq_sum": "sq_sum", "count": "count"}
    _batchable = True

    def statistic_shapes(self, d: int) -> Shapes:
        return {"sq_sum": (), "count": ()}

    def statistics(self, x: Tensor) -> dict[str, Tensor]:
        return {"sq_sum": x.pow(2).sum(), "count": count_of(x)}

    def value(self, stats: Stats) -> Tensor:
        return self.weight * stats["sq_sum"] / nonzero(stats["count"])


class AR(Penalty):
    """Activation regularization (AWD-LSTM): ``alpha * sum_ij x_ij^2 / (n * d)`` = alpha * mean(x^2).

    ``alpha``: a finite number >= 0.
    """

    _primitives: ClassVar[dict[str, str]] = {"sq_sum": "sq_sum", "elements": "elements"}
    _batchable = True
    _scale = "alpha"

    def __init__(self, alpha: float) -> None:
        self.alpha = real_parameter(type(self).__name__, "alpha", alpha)

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
    ``beta``: a finite number >= 0; ``time_dim``: an integer (negative counts from the end).

    Leaving ``time_dim`` out means ``time_dim=1`` (batch-first ``[batch, time, ..., d]``), and the
    first activation of 3 or more dimensions then warns once (per penalty object): a time-major
    tensor ``[time, batch, d]`` (``nn.LSTM`` without ``batch_first=True``, AWD-LSTM) would be
    differenced across neighbouring sequences of the batch without any error. Give ``time_dim``
    (``0`` for time-major, ``1`` for batch-first) to say which.
    """

    _batchable = True
    _scale = "beta"
    _raw_input = True  # record() takes the activation as produced (no float32 copy is kept)

    def __init__(self, beta: float, time_dim: int | None = None) -> None:
        self.beta = real_parameter(type(self).__name__, "beta", beta)
        self.time_dim = int_parameter(type(self).__name__, "time_dim", 1 if time_dim is None else time_dim)
        self._unconfirmed_time_dim = time_dim is None  # warn at the first record >= 3-D (not a setting)

    def hyperparameters(self) -> dict[str, Any]:
        return {"beta": self.beta, "time_dim": self.time_dim}

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
        if self._unconfirmed_time_dim and x.dim() >= 3:
            self._unconfirmed_time_dim = False
            _warn_default_time_dim(self.beta, tuple(x.shape))
        acc = torch.promote_types(x.dtype, torch.float32)
        if x.shape[td] < 2:
            zero = torch.zeros((), dtype=acc, device=x.device)
            return {"diff_sq_sum": zero, "elements": zero}
        sq, n = temporal_differences(x, position_mask(x, mask), td, acc).unbind()
        return {"diff_sq_sum": sq, "elements": n}

    def value(self, stats: Stats) -> Tensor:
        return self.beta * stats["diff_sq_sum"] / nonzero(stats["elements"])


def _warn_default_time_dim(beta: float, shape: tuple[int, ...]) -> None:
    warnings.warn(
        f"TAR(beta={beta}) was given no time_dim, so it differences along dimension 1 of the "
        f"activation of shape {shape}, taking it as batch-first [batch, time, ..., d]. If it is "
        "time-major [time, batch, d] (nn.LSTM/GRU without batch_first=True, AWD-LSTM), dimension 1 "
        "is the batch and the penalty is wrong: pass TAR(beta, time_dim=0). Pass time_dim=1 to "
        "confirm batch-first and silence this warning.",
        UserWarning,
        stacklevel=2,
    )


class KLSparsity(Penalty):
    """KL sparsity target of sparse autoencoders.

    ``weight * sum_j KL(target || rho_j)`` with ``rho_j = clamp(mu_j, eps, 1 - eps)`` and
    ``KL(p || q) = p log(p/q) + (1-p) log((1-p)/(1-q))``. Activations are expected in [0, 1]
    (e.g. sigmoid outputs). ``target``: a probability in (0, 1); ``weight``: a finite number >= 0;
    ``eps``: in (0, 0.5), so that the clamp interval ``[eps, 1 - eps]`` is not empty and the
    logarithms stay finite.
    """

    _primitives: ClassVar[dict[str, str]] = {"sum": "sum", "count": "count"}
    _batchable = True

    def __init__(self, target: float, weight: float, eps: float = 1e-6) -> None:
        name = type(self).__name__
        self.target = real_parameter(name, "target", target, 0.0, 1.0, open_low=True, open_high=True)
        self.weight = real_parameter(name, "weight", weight)
        self.eps = real_parameter(name, "eps", eps, 0.0, 0.5, open_low=True, open_high=True)

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


class LoadBalance(Penalty):
    """Switch/GShard load-balancing loss on router logits ``[..., num_experts]``.

    ``weight * E * sum_e f_e P_e`` with ``f_e = (top-k assignments to e) / (n k)`` (not
    differentiable) and ``P_e = sum_i softmax(x_i)_e / n``. ``num_experts``: an integer >= 1,
    equal to the router logits' last dimension (checked when they are recorded); ``top_k``: an
    integer in [1, num_experts]; ``weight``: a finite number >= 0.
    """

    _batchable = True
    _constant: ClassVar[frozenset[str]] = frozenset({"count", "assigned"})

    def __init__(self, num_experts: int, top_k: int, weight: float) -> None:
        name = type(self).__name__
        self.num_experts = int_parameter(name, "num_experts", num_experts, 1)
        self.top_k = int_parameter(name, "top_k", top_k, 1)
        if self.top_k > self.num_experts:
            raise ValueError(
                f"{name}: top_k must be an integer in [1, num_experts], got top_k={self.top_k} with "
                f"num_experts={self.num_experts} (a token cannot be routed to more experts than exist)"
            )
        self.weight = real_parameter(name, "weight", weight)

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
    """Router z-loss (ST-MoE): ``weight * sum_i logsumexp(x_i)^2 / n`` on router logits.

    ``weight``: a finite number >= 0.
    """

    _batchable = True

    def __init__(self, weight: float) -> None:
        self.weight = real_parameter(type(self).__name__, "weight", weight)

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
