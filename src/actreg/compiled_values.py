"""A step's penalty values as two generated kernels (fused mode): one in forward, one in backward.

Eagerly, :meth:`actreg.values.Evaluator.total` takes a dozen small ops for ``L1`` on any number of
layers (reads of the step buffer, the values, their sum, the finiteness decision) and, for the
Gram penalties, several passes over every ``d x d`` matrix in forward and backward (the centred
covariance, its norm; the gradient, :class:`~actreg.values.Gathered`'s zero buffer and its
``where``). Here the same maths -- the very ``Penalty.value`` code, read through the same views --
is traced once per layout with fake tensors (``make_fx``) and compiled by inductor
(:func:`actreg.fused._compile`), as two functions of the reduced statistics ``S`` and the step's
decision ``ok``:

- forward: ``(where(ok', total, 0), ok')`` with ``total = sum of every penalty's value`` and
  ``ok' = ok & isfinite(total)``;
- backward: ``dS = d/dS where(ok', total(where(ok, S, S.detach())), 0) * g`` -- the gradient that
  the eager path gives, zero (NaN included) where ``ok`` is False, written in one buffer.

The backward recomputes what it needs from ``S`` (nothing is saved but ``S`` itself): for a Gram
penalty its gradient is then one read of the Gram matrices and one write of the gradient.

A value that cannot be traced this way (a user penalty that reads a tensor on the host, branches
on data, or calls something inductor cannot compile) makes the build fail: a warning, once per
layout, and the eager evaluation, with the same values.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import fused as _fused

Sum = Callable[[Tensor, Tensor | None, Tensor | None], Tensor]

#: one build at a time: tracing is not re-entrant (the shadow steps of a ``Join`` run in threads,
#: see :mod:`actreg.joining`; two of them tracing at once broke make_fx's patcher, found by the soak)
lock = threading.Lock()


@dataclass(frozen=True)
class ValueKernels:
    """The compiled forward and backward of a layout's values, for inputs shaped as they were built
    for (``S`` contiguous from offset 0; ``batch_scale`` and ``window`` present or not)."""

    forward: _fused.Kernel  #: ``forward(S, ok, [batch_scale], [window]) -> (total, ok')``
    backward: _fused.Kernel  #: ``backward(S, ok, [batch_scale], [window], g) -> (dS,)``
    size: int
    dtype: torch.dtype
    scaled: bool
    windowed: bool


def build(
    total: Sum, stats: Tensor, ok: Tensor, batch_scale: Tensor | None, window: Tensor | None
) -> ValueKernels | None:
    """Trace and compile ``total(S, batch_scale, window)`` (the sum of a layout's values) for inputs
    like these; None (and a warning) when that fails."""
    if not _fused.available():
        return None
    scaled, windowed = batch_scale is not None, window is not None

    def split(args: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, list[Tensor]]:
        it = iter(args)
        s, k = next(it), next(it)
        b = next(it) if scaled else None
        w = next(it) if windowed else None
        return s, k, b, w, list(it)

    def forward(*args: Tensor) -> tuple[Tensor, Tensor]:
        s, k, b, w, _ = split(args)
        value = total(s, b, w)
        good = k & torch.isfinite(value)
        return torch.where(good, value, 0.0), good

    def backward(*args: Tensor) -> Tensor:
        s, k, b, w, rest = split(args)
        with torch.enable_grad():
            leaf = s.detach().requires_grad_()
            value = total(torch.where(k, leaf, leaf.detach()), b, w)
            good = k & torch.isfinite(value.detach())
            masked = torch.where(good, value, 0.0)
            if not masked.requires_grad:  # (no value reads a differentiated statistic)
                return torch.zeros_like(s)
            (grad,) = torch.autograd.grad(masked, leaf, rest[0], allow_unused=True)
        return torch.zeros_like(s) if grad is None else grad

    inputs = [t for t in (stats.detach(), ok, batch_scale, window) if t is not None]
    start = time.perf_counter()
    try:
        with torch.no_grad():
            fwd = _fused._compile(forward, inputs, fixed=True)
            bwd = _fused._compile(backward, [*inputs, stats.new_ones(())], fixed=True)
    except Exception as err:  # (a value dynamo-free tracing cannot follow, no C++ compiler, ...)
        warnings.warn(
            f"actreg: compiling the penalty values failed ({type(err).__name__}: {str(err)[:300]}); "
            "they are evaluated eagerly instead (the same values)",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
    finally:
        _fused.compile_seconds[("values", len(_fused.compile_seconds))] = time.perf_counter() - start
    return ValueKernels(fwd, bwd, stats.numel(), stats.dtype, scaled, windowed)


def fits(kernels: ValueKernels, stats: Tensor, batch_scale: Tensor | None, window: Tensor | None) -> bool:
    """Whether ``kernels`` were built for inputs like these (shapes only: nothing is read)."""
    return (
        stats.numel() == kernels.size
        and stats.dtype == kernels.dtype
        and stats.storage_offset() == 0
        and stats.is_contiguous()
        and (batch_scale is not None) == kernels.scaled
        and (window is not None) == kernels.windowed
        and (window is None or (window.storage_offset() == 0 and window.is_contiguous()))
    )


class CompiledValues(torch.autograd.Function):
    """``total, ok' = CompiledValues.apply(S, ok, batch_scale, window, kernels)`` (see the module
    docstring); saves ``S`` and the decision inputs, nothing computed."""

    @staticmethod
    def forward(
        ctx: Any,
        stats: Tensor,
        ok: Tensor,
        batch_scale: Tensor | None,
        window: Tensor | None,
        kernels: ValueKernels,
    ) -> tuple[Tensor, Tensor]:
        args = [t for t in (stats, ok, batch_scale, window) if t is not None]
        total, good = kernels.forward(*args)
        ctx.save_for_backward(*args)
        ctx.kernels = kernels
        ctx.mark_non_differentiable(good)
        return total, good

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _: Tensor | None) -> tuple[Tensor | None, None, None, None, None]:
        kernels: ValueKernels = ctx.kernels
        (g_stats,) = kernels.backward(*ctx.saved_tensors, grad.contiguous())
        return g_stats, None, None, None, None
