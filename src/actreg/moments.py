"""Moment penalties: DeCov and VICReg's variance and covariance terms.

They are shift-invariant: their first and second moments are taken around a shift common to all
ranks (see :mod:`actreg.centering`), which keeps float32 sums accurate when ``|mean| >> std``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from .layout import DIAGONAL, KERNEL
from .penalty import BATCH_COUNT, Penalty, Shapes, Stats, _per_unit, count_of, nonzero, real_parameter


class OffDiagonalEnergy(torch.autograd.Function):
    """``sum_{i != j} C_ij^2`` of the biased covariance ``C = outer / n - mu mu^T``, ``mu = sum / n``.

    Batched over leading dimensions; ``n = 0`` gives 0. Closed-form backward (``n`` is a count and
    gets no gradient): with ``C'`` = ``C`` without its diagonal,
    ``d/d outer = 2 C' / n`` and ``d/d sum = -4 C' mu / n`` -- a few passes over the ``d x d``
    matrices instead of autograd's dozen, and one buffer of them (``C'``, which the backward turns
    into ``d/d outer`` in place).
    """

    @staticmethod
    def forward(ctx: Any, outer: Tensor, total: Tensor, count: Tensor) -> Tensor:
        single = outer.dim() == 2
        if single:
            outer, total, count = outer.unsqueeze(0), total.unsqueeze(0), count.reshape(1)
        n = nonzero(count)
        mean = total / n.unsqueeze(-1)
        scaled = _scaled_off_diagonal(outer, total, mean)
        # ||C'||_F^2 (vector_norm: about twice as fast as vecdot(flat, flat) on a CPU)
        energy = torch.linalg.vector_norm(scaled.flatten(-2), dim=-1).square() / n.square()
        ctx.save_for_backward(outer, total, mean, n)
        # C' itself, not saved: the backward scales it in place into the gradient (no new buffer
        # the size of every Gram matrix) and recomputes it from the inputs if the graph is
        # backpropagated through again (retain_graph)
        ctx.scaled = scaled
        ctx.single = single
        out: Tensor = energy[0] if single else energy
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        outer, total, mean, n = ctx.saved_tensors
        scaled = ctx.scaled
        ctx.scaled = None
        if scaled is None:  # a second backward through this graph: C' again
            scaled = _scaled_off_diagonal(outer, total, mean)
        if ctx.single:
            grad = grad.reshape(1)
        g_outer = scaled.mul_((2 * grad / n.square())[..., None, None])  # 2 g C' / n, in place
        # -4 g C' mu / n as the row mu^T C' (C' is symmetric): one batched row-times-matrix
        # product; vecdot(g_outer, mu) forms the k x d x d product before summing it (a fresh
        # buffer the size of every Gram matrix), and a matmul with one column is slow on a CPU.
        # 8 x 512^2 on one CPU thread: 0.21 ms against vecdot's 0.75-1.5 ms and matmul's 2.5 ms
        g_sum = torch.bmm(mean.unsqueeze(-2), g_outer).squeeze(-2).mul_(-2)
        if ctx.single:
            return g_outer[0], g_sum[0], None
        return g_outer, g_sum, None


def _scaled_off_diagonal(outer: Tensor, total: Tensor, mean: Tensor) -> Tensor:
    """``n C'``: ``outer - sum mu^T`` in one pass (a new tensor), its diagonal zeroed (it never
    counts)."""
    scaled = torch.baddbmm(outer, total.unsqueeze(-1), mean.unsqueeze(-2), alpha=-1)
    scaled.diagonal(dim1=-2, dim2=-1).zero_()
    return scaled


class KernelOffDiagonalEnergy(torch.autograd.Function):
    """``sum_{i != j} C_ij^2`` of ``C = R^T R / n - m m^T`` from the gathered centred rows ``R``
    (``N x d``, zero rows allowed) without any ``d x d`` matrix: from ``K = R R^T`` (``N x N``),
    ``q = diag(R^T R)`` (``d``), ``s = R^T 1`` (the centred sum, ``d``) and the count ``n``.

    With ``m = s / n``, ``u = K 1 = R s`` and ``c = diag C = q / n - m^2``:

        ||C||_F^2 = ||K||_F^2 / n^2 - 2 ||u||^2 / n^3 + (s . s)^2 / n^4
        energy    = ||C||_F^2 - ||c||^2

    (``||R^T R||_F = ||R R^T||_F`` and ``R m = u / n``.) ``O(N^2 d)`` with the kernel's product,
    ``O(N^2 + d)`` here. Batched over leading dimensions; ``n = 0`` gives 0. Closed-form backward
    (``n`` gets no gradient): ``d/dK = 2 K / n^2 - 4 u 1^T / n^3``,
    ``d/ds = 4 (s . s) s / n^4 + 4 c s / n^2``, ``d/dq = -2 c / n``.
    """

    @staticmethod
    def forward(ctx: Any, kernel: Tensor, diagonal: Tensor, total: Tensor, count: Tensor) -> Tensor:
        n = nonzero(count)
        u = kernel.sum(-1)
        ss = torch.linalg.vecdot(total, total)
        nu = _per_unit(n)
        c = diagonal / nu - (total / nu).square()
        frobenius = (
            kernel.flatten(-2).square().sum(-1) / n.square()
            - 2 * torch.linalg.vecdot(u, u) / n.pow(3)
            + ss.square() / n.pow(4)
        )
        ctx.save_for_backward(kernel, total, u, ss, c, n)
        energy: Tensor = frobenius - torch.linalg.vecdot(c, c)
        return energy

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        kernel, total, u, ss, c, n = ctx.saved_tensors
        g = grad / n.square()  # g / n^2
        gn = _per_unit(g)
        g_kernel = kernel * (2 * g)[..., None, None] - (u * (4 * gn / _per_unit(n))).unsqueeze(-1)
        g_total = total * (4 * _per_unit(g * ss / n.square()) + 4 * c * gn)
        g_diagonal = -2 * c * _per_unit(grad / n)
        return g_kernel, g_diagonal, g_total, None


def _off_diagonal_energy(stats: Stats) -> Tensor:
    """``sum_{i != j} C_ij^2`` of the biased covariance of ``stats``: (sum, outer, count), or, for a
    slot whose rows were gathered, (sum, kernel, diagonal, count) -- see ``layout.KERNEL``."""
    energy: Tensor
    if KERNEL in stats:
        energy = KernelOffDiagonalEnergy.apply(stats[KERNEL], stats[DIAGONAL], stats["sum"], stats["count"])
    else:
        energy = OffDiagonalEnergy.apply(stats["outer"], stats["sum"], stats["count"])
    return energy


#: how far above 1 the sample size of an unbiased estimate must be (see :func:`_bessel`)
BESSEL_MARGIN = 1e-4


def _bessel(stats: Stats) -> tuple[Tensor, Tensor]:
    """Factor n/(n-1) of the unbiased estimate, and whether it is defined: n > 1 + 1e-4.

    The margin matters in ``ema`` mode, where n is the bias-corrected moving average of the
    per-step global counts: counts of 1 average to 1 only up to rounding, and n/(n-1) squared
    would turn that rounding into a spike of 1e9 or more (found by the soak: a float32 ``ema``
    scenario with one kept row per step; the float64 reference spiked to 1e27 from its own
    rounding). In ``global`` and ``local`` mode n is a whole count, and the margin changes
    nothing."""
    nb = stats.get(BATCH_COUNT, stats["count"])
    defined = nb > 1 + BESSEL_MARGIN
    return torch.where(defined, nb / torch.where(defined, nb - 1, 1.0), 0.0), defined


class _GramPenalty(Penalty):
    """A penalty of the covariance of the features: first moments, Gram matrix and count, taken
    around the slot's shift. ``weight``: a finite number >= 0."""

    centered: ClassVar[dict[str, str]] = {"sum": "first", "outer": "outer"}
    _primitives: ClassVar[dict[str, str]] = {"sum": "csum", "outer": "couter", "count": "count"}
    _batchable = True

    def __init__(self, weight: float) -> None:
        self.weight = real_parameter(type(self).__name__, "weight", weight)

    def statistic_shapes(self, d: int) -> Shapes:
        return {"sum": (d,), "outer": (d, d), "count": ()}

    def statistics(self, x: Tensor) -> dict[str, Tensor]:
        return {"sum": x.sum(0), "outer": x.T @ x, "count": count_of(x)}

    def value(self, stats: Stats) -> Tensor:
        raise NotImplementedError


class DeCov(_GramPenalty):
    """DeCov (Cogswell et al., 2016): ``weight * 0.5 * (||C||_F^2 - ||diag C||^2)``.

    ``C = sum_i x_i x_i^T / n - mu mu^T`` is the biased covariance of the features.
    ``weight``: a finite number >= 0.
    """

    def value(self, stats: Stats) -> Tensor:
        return self.weight * 0.5 * _off_diagonal_energy(stats)


class VarianceFloor(Penalty):
    """VICReg variance term: ``weight * mean_j relu(gamma - sqrt(var_j + eps))``.

    ``var_j`` is the unbiased variance ``(sum_i x_ij^2 - n mu_j^2) / (n - 1)``; with ``n <= 1``
    (``ema``: within 1e-4 of 1) it is
    undefined and the penalty is 0. ``weight``: a finite number >= 0; ``gamma`` (the target
    standard deviation): a finite number > 0; ``eps``: a finite number > 0 (it keeps the square
    root's gradient finite at zero variance).
    """

    centered: ClassVar[dict[str, str]] = {"sum": "first", "sq_sum": "square"}
    _primitives: ClassVar[dict[str, str]] = {"sum": "csum", "sq_sum": "csq", "count": "count"}
    _batchable = True

    def __init__(self, weight: float, gamma: float = 1.0, eps: float = 1e-4) -> None:
        name = type(self).__name__
        self.weight = real_parameter(name, "weight", weight)
        self.gamma = real_parameter(name, "gamma", gamma, open_low=True)
        self.eps = real_parameter(name, "eps", eps, open_low=True)

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


class Covariance(_GramPenalty):
    """VICReg covariance term: ``weight * sum_{i != j} C_ij^2 / d``.

    ``C = (sum_i x_i x_i^T - n mu mu^T) / (n - 1)`` is the unbiased covariance; 0 when ``n <= 1``
    (``ema``: within 1e-4 of 1).
    ``weight``: a finite number >= 0.
    """

    def value(self, stats: Stats) -> Tensor:
        factor, defined = _bessel(stats)
        off = _off_diagonal_energy(stats) * factor.square()  # C_unbiased = factor * C_biased
        return torch.where(defined, self.weight * off / stats["sum"].shape[-1], 0.0)
