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


#: router scores ``LoadBalance``/``SequenceBalance`` accept, and how each turns logits into ``p_ie``
SCORES = ("softmax", "sigmoid")


def _score_parameter(penalty: str, score: object) -> str:
    if not isinstance(score, str) or score not in SCORES:
        raise ValueError(
            f"{penalty}: score must be one of {list(SCORES)} (how router logits become the "
            f"probabilities p_ie: 'softmax' as Switch/GShard/Mixtral, 'sigmoid' as DeepSeek-V3, "
            f"sigmoid scores normalised over the experts of each token), got {score!r}"
        )
    return score


#: where ``LoadBalance`` takes ``f`` from (see its docstring)
WINDOW_COUNTS = ("batch", "window")


class _Router:
    """What ``LoadBalance`` and ``SequenceBalance`` share: the router's scores and its top-k choice."""

    num_experts: int
    top_k: int
    weight: float
    score: str
    #: the recorder passes the slot's expert bias (``bias=``) to ``record``/``record_sequences``
    _routes: ClassVar[bool] = True

    def _init_router(self, num_experts: int, top_k: int, weight: float, score: str) -> None:
        name = type(self).__name__
        self.num_experts = int_parameter(name, "num_experts", num_experts, 1)
        self.top_k = int_parameter(name, "top_k", top_k, 1)
        if self.top_k > self.num_experts:
            raise ValueError(
                f"{name}: top_k must be an integer in [1, num_experts], got top_k={self.top_k} with "
                f"num_experts={self.num_experts} (a token cannot be routed to more experts than exist)"
            )
        self.weight = real_parameter(name, "weight", weight)
        self.score = _score_parameter(name, score)

    def _router_hyperparameters(self, extra: dict[str, Any]) -> dict[str, Any]:
        # the default score is left out, so that reprs (compared across ranks, kept in checkpoints
        # and logs) read as before score= existed
        out = {"num_experts": self.num_experts, "top_k": self.top_k, "weight": self.weight, **extra}
        if self.score != "softmax":
            out["score"] = self.score
        return dict(sorted(out.items()))

    def check_features(self, d: int) -> None:
        if d != self.num_experts:
            raise ValueError(
                f"{type(self).__name__}(num_experts={self.num_experts}) got router logits with {d} "
                "features: the last dimension of what it records must be the number of experts"
            )

    def _probabilities(self, x: Tensor) -> Tensor:
        """``p_ie`` of router logits ``x`` ``[..., E]``: softmax, or sigmoid / its sum over experts."""
        if self.score == "softmax":
            return torch.softmax(x, dim=-1)
        # sigmoid(x_e) / sum_j sigmoid(x_j) = softmax(log sigmoid(x))_e: two ops each way, no 0/0
        return torch.softmax(torch.nn.functional.logsigmoid(x), dim=-1)

    def _scores(self, x: Tensor) -> Tensor:
        """The scores an expert bias is added to: ``softmax(x)`` or ``sigmoid(x)`` (DeepSeek-V3's
        affinities ``s_ie``, not normalised: the bias is added before any normalisation)."""
        return torch.softmax(x, dim=-1) if self.score == "softmax" else torch.sigmoid(x)

    def _chosen(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """Indices ``[..., k]`` of each token's top-k experts (no gradient).

        Without ``bias``, taken on the logits: both scores are increasing functions of them, so the
        choice is the top-k of the scores. With an expert ``bias`` ``[E]`` (:class:`ExpertBias`,
        DeepSeek-V3's aux-loss-free balancing), ``topk(scores(x) + bias)``: the bias moves the choice
        only, never the probabilities ``p_ie``.
        """
        x = x.detach()
        if bias is None:
            return torch.topk(x, self.top_k, dim=-1).indices
        return torch.topk(self._scores(x) + bias.to(x.device), self.top_k, dim=-1).indices


class LoadBalance(_Router, Penalty):
    """Switch/GShard load-balancing loss on router logits ``[..., num_experts]``.

    ``weight * E * sum_e f_e P_e`` with ``f_e = (top-k assignments to e) / (n k)`` (not
    differentiable) and ``P_e = sum_i p_ie / n``, over the ``n`` kept positions (tokens) of the
    global batch. ``num_experts``: an integer >= 1, equal to the router logits' last dimension
    (checked when they are recorded); ``top_k``: an integer in [1, num_experts]; ``weight``: a finite
    number >= 0; ``score``: ``"softmax"`` (default; ``p_i = softmax(x_i)``, Switch, GShard,
    Mixtral, Qwen) or ``"sigmoid"`` (DeepSeek-V3: ``p_ie = sigmoid(x_ie) / sum_j sigmoid(x_ij)``).
    Each token's top-k experts are chosen on the same scores.

    ``counts``: where ``f`` comes from. ``"batch"`` (default): the step's global batch, as above.
    ``"window"`` (Qwen's Algorithm 1 with a buffer, Megatron's ``global_aux_loss``): under gradient
    accumulation, ``f_e = W_e / (N k)`` from the reduced counts of every ``loss()`` of the optimizer
    step's window so far (this one included; every rank), ``W_e`` its top-k assignments to ``e``
    and ``N`` its kept tokens, while ``P_e`` stays that of the current ``loss()``'s global batch. The
    window is a device tensor kept by the regularizer and closed by ``reg.update_bias()`` or the
    hook of ``reg.attach(optimizer)`` (once per optimizer step); no graph is kept across ``loss()``
    calls. See docs/accumulation.md.
    """

    _batchable = True
    _constant: ClassVar[frozenset[str]] = frozenset({"count", "assigned"})

    def __init__(
        self, num_experts: int, top_k: int, weight: float, score: str = "softmax", counts: str = "batch"
    ) -> None:
        self._init_router(num_experts, top_k, weight, score)
        if not isinstance(counts, str) or counts not in WINDOW_COUNTS:
            raise ValueError(
                f"{type(self).__name__}: counts must be one of {list(WINDOW_COUNTS)} ('batch': f from the "
                "step's global batch; 'window': f from the counts of every loss() since the last "
                f"optimizer step, reg.update_bias() / reg.attach(optimizer)), got {counts!r}"
            )
        self.counts = counts
        #: statistics also read from the regularizer's window of reduced counts (``window_<name>``)
        self._windowed: frozenset[str] = (
            frozenset({"assigned", "count"}) if counts == "window" else frozenset()
        )

    def hyperparameters(self) -> dict[str, Any]:
        return self._router_hyperparameters({} if self.counts == "batch" else {"counts": self.counts})

    def statistic_shapes(self, d: int) -> Shapes:
        return {"assigned": (d,), "prob_sum": (d,), "count": ()}

    def statistics(self, x: Tensor) -> dict[str, Tensor]:
        return self.record(x, None)

    def record(self, x: Tensor, mask: Tensor | None, bias: Tensor | None = None) -> dict[str, Tensor]:
        x, keep = _masked(x, mask)
        lead = tuple(range(x.dim() - 1))
        probs = self._probabilities(x)
        chosen = self._chosen(x, bias)
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
        if self.counts == "window":
            f = stats["window_assigned"] / (_per_unit(nonzero(stats["window_count"])) * self.top_k)
        else:
            f = stats["assigned"] / (n * self.top_k)
        p = stats["prob_sum"] / n
        return self.weight * self.num_experts * (f * p).sum(-1)


class SequenceBalance(_Router, Penalty):
    """Sequence-wise load balance (DeepSeek-V3's complementary loss, Megatron's ``seq_aux_loss``).

    ``weight * (1/S) sum_s E sum_e f_se P_se``: ``LoadBalance``'s ``E sum_e f_e P_e`` taken over the
    tokens of each sequence ``s`` alone -- ``f_se = (top-k assignments of s's tokens to e) / (n_s k)``
    (not differentiable), ``P_se = sum_{i in s} p_ie / n_s``, ``n_s`` the kept tokens of ``s`` --
    then averaged over the ``S`` sequences that have a kept token in the step (of the global batch:
    every rank of the group).

    Each token's sequence is given as its **global** sequence index in ``[0, num_sequences)``:
    ``reg.observe(name, logits, mask, sequence=ids)`` with ``ids`` an integer tensor that broadcasts
    over the positions of ``logits`` (``[batch, 1]`` or ``[batch, time]`` for ``[batch, time, E]``).
    The statistics are rows indexed by that number, summed over every rank by the step's one
    collective, so a sequence split over context-parallel ranks (each holding a slice of its tokens)
    gets its statistics summed before the per-sequence product: the value and the gradients are
    those of one process holding every sequence whole. Two ranks must use the same index for the
    same sequence and different indices for different ones (e.g. ``dp_rank * sequences_per_rank +
    b`` for the ``b``-th sequence of a data-parallel rank, the same on its context-parallel peers).

    ``num_sequences``: an integer >= 1, at least the number of sequences in a step's global batch
    (rows without tokens do not count in ``S``); the statistics take ``num_sequences * (2E + 1)``
    values of the step's buffer. A kept token whose index lies outside ``[0, num_sequences)`` makes
    the step's statistics NaN (``NonFiniteStatisticError``, or a skipped step with
    ``nonfinite="skip"``), decided on the device. ``num_experts``, ``top_k``, ``weight``, ``score``:
    as for :class:`LoadBalance`. In ``ema`` mode the rows average by index across steps.
    """

    _batchable = True
    _constant: ClassVar[frozenset[str]] = frozenset({"count", "assigned"})
    _sequence_input = True  # record_sequences(x, mask, sequence), fed by reg.observe(..., sequence=)

    def __init__(
        self, num_experts: int, top_k: int, weight: float, num_sequences: int, score: str = "softmax"
    ) -> None:
        self._init_router(num_experts, top_k, weight, score)
        self.num_sequences = int_parameter(type(self).__name__, "num_sequences", num_sequences, 1)

    def hyperparameters(self) -> dict[str, Any]:
        return self._router_hyperparameters({"num_sequences": self.num_sequences})

    def statistic_shapes(self, d: int) -> Shapes:
        s = self.num_sequences
        return {"assigned": (s, d), "prob_sum": (s, d), "count": (s,)}

    def record(self, x: Tensor, mask: Tensor | None, bias: Tensor | None = None) -> dict[str, Tensor]:
        raise ValueError(
            f"{self!r} needs each token's global sequence index: feed the router logits with "
            "reg.observe(name, logits, mask, sequence=ids), ids an integer tensor over the positions"
        )

    def record_sequences(
        self, x: Tensor, mask: Tensor | None, sequence: Tensor, bias: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Per-sequence statistics of router logits ``x`` ``[..., E]``; ``sequence``: each
        position's global sequence index (broadcast over ``x.shape[:-1]``)."""
        x, keep = _masked(x, mask)
        e, rows = x.shape[-1], self.num_sequences
        try:
            seq = torch.broadcast_to(sequence.to(x.device), x.shape[:-1]).reshape(-1)
        except RuntimeError as err:
            raise ValueError(
                f"sequence of shape {tuple(sequence.shape)} does not broadcast over the positions "
                f"{tuple(x.shape[:-1])} of router logits of shape {tuple(x.shape)}"
            ) from err
        probs = self._probabilities(x).reshape(-1, e)
        chosen = self._chosen(x, bias).reshape(-1, self.top_k)
        inside = seq.clamp(0, rows - 1)
        bad = inside != seq
        weight = torch.ones_like(seq, dtype=x.dtype)
        if keep is not None:
            kept = keep.reshape(-1)
            probs = torch.where(kept.unsqueeze(-1), probs, 0.0)
            weight = kept.to(x.dtype)
            bad = bad & kept
        # a kept token outside [0, num_sequences): NaN statistics, decided on the device (no sync)
        counts = torch.where(bad, math.nan, weight)
        count = torch.zeros(rows, dtype=x.dtype, device=x.device).index_add_(0, inside, counts)
        prob_sum = torch.zeros(rows, e, dtype=x.dtype, device=x.device).index_add(0, inside, probs)
        cells = (inside * e).unsqueeze(-1) + chosen
        votes = weight.unsqueeze(-1).expand(-1, self.top_k)
        assigned = torch.zeros(rows * e, dtype=x.dtype, device=x.device)
        assigned.index_add_(0, cells.reshape(-1), votes.reshape(-1))
        return {"assigned": assigned.view(rows, e), "prob_sum": prob_sum, "count": count}

    def value(self, stats: Stats) -> Tensor:
        n = stats["count"]  # [..., S]
        per_token = _per_unit(nonzero(n))
        f = stats["assigned"] / (per_token * self.top_k)
        p = stats["prob_sum"] / per_token
        present = (n > 0).to(n.dtype).sum(-1)
        per_sequence = (f * p).sum((-2, -1))  # (empty rows add 0)
        return self.weight * self.num_experts * per_sequence / nonzero(present)


#: bias updates ``ExpertBias`` accepts (see its docstring)
BIAS_UPDATES = ("sign", "centred")


class ExpertBias(_Router, Penalty):
    """Aux-loss-free balancing (DeepSeek-V3 §2.1.2): an expert bias ``b`` ``[num_experts]`` per
    router, added to the router scores for the top-k choice only, moved once per optimizer step by
    the token counts of the whole window. No loss: its value is 0.

    Register it on the router's slot, e.g. ``{"router": [ExpertBias(8, 2), LoadBalance(8, 2, 1e-4)]}``
    (one per slot; its glob may match many routers: each slot keeps its own bias). The model routes
    with ``reg.route(name, logits)`` (the indices of ``topk(scores + b)``) or adds
    ``reg.expert_bias(name)`` to its scores itself; every router penalty of the slot
    (``LoadBalance``, ``SequenceBalance``) records the same biased choice.

    Statistics: ``load_e`` (``"assigned"``), the top-k assignments of the kept tokens to expert
    ``e``, summed over the ranks by the step's one collective and over the ``loss()`` calls of the
    window on the device. ``reg.update_bias()`` (or the optimizer hook of ``reg.attach(optimizer)``)
    then applies, with ``L = sum_e load_e`` and ``E = num_experts``::

        sign:    b_e += rate * sign(L/E - load_e)                          (DeepSeek-V3, Megatron)
        centred: d_e  = rate * sign(L/E - load_e);  b_e += d_e - mean_j d_j     (torchtitan)

    ``num_experts``: an integer >= 1 (the logits' last dimension); ``top_k``: in [1, num_experts];
    ``rate``: a finite number >= 0 (DeepSeek-V3's bias update speed γ = 1e-3); ``update``: ``"sign"``
    or ``"centred"``; ``score``: the scores the bias is added to, ``"softmax"`` (``softmax(x)``) or
    ``"sigmoid"`` (``sigmoid(x)``, DeepSeek-V3's affinities).
    """

    _batchable = True
    _constant: ClassVar[frozenset[str]] = frozenset({"assigned"})

    def __init__(
        self, num_experts: int, top_k: int, rate: float = 1e-3, update: str = "sign", score: str = "softmax"
    ) -> None:
        self._init_router(num_experts, top_k, 0.0, score)
        name = type(self).__name__
        self.rate = real_parameter(name, "rate", rate)
        if not isinstance(update, str) or update not in BIAS_UPDATES:
            raise ValueError(
                f"{name}: update must be one of {list(BIAS_UPDATES)} ('sign': b += rate * sign(mean load "
                f"- load), DeepSeek-V3; 'centred': the same step minus its mean over experts, "
                f"torchtitan), got {update!r}"
            )
        self.update = update

    def hyperparameters(self) -> dict[str, Any]:
        out = self._router_hyperparameters({"rate": self.rate})
        del out["weight"]
        if self.update != "sign":
            out["update"] = self.update
        return dict(sorted(out.items()))

    def statistic_shapes(self, d: int) -> Shapes:
        return {"assigned": (d,)}

    def statistics(self, x: Tensor) -> dict[str, Tensor]:
        return self.record(x, None)

    def record(self, x: Tensor, mask: Tensor | None, bias: Tensor | None = None) -> dict[str, Tensor]:
        x, keep = _masked(x, mask)
        chosen = self._chosen(x, bias)
        votes = torch.ones_like(chosen, dtype=x.dtype)
        if keep is not None:
            votes = votes * keep.unsqueeze(-1)
        assigned = torch.zeros(x.shape[-1], dtype=x.dtype, device=x.device)
        return {"assigned": assigned.index_add_(0, chosen.reshape(-1), votes.reshape(-1))}

    def value(self, stats: Stats) -> Tensor:
        return stats["assigned"].sum(-1) * 0.0  # no loss (NaN statistics still show)


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
