"""The fused statistics of one recorded activation: one autograd node, closed-form gradient.

Every slot computes a *block*: a flat vector holding, in this order,

    count, abs_sum, sq_sum | active[d] | sum[d]? | csum[d]? | csq[d]? | couter[d*d]? | extras

- ``count`` (kept positions), ``abs_sum = sum |x|``, ``sq_sum = sum x^2`` and ``active`` (per unit,
  the number of positions where ``|x| > threshold``) are always there: they feed the activity
  metrics and ``L1`` / ``L2`` / ``AR``;
- ``sum`` (per unit, raw) when a penalty needs it (``KLSparsity``);
- ``csum``, ``csq`` and ``couter`` are first moments, per-unit second moments and the Gram matrix of
  ``x - c`` around the slot's shift ``c`` (see :mod:`actreg.centering`), for centred penalties;
- ``extras`` are the statistics of penalties that compute their own (``TAR``, ``LoadBalance``,
  ``ZLoss``, user penalties), concatenated by the recorder.

:class:`FusedStatistics` computes the primitive part in one pass per statistic, accumulating in
float32 (float64 for float64 input) with autocast disabled, and saves only ``x`` (the activation
the layer produced, not a copy), the position mask and the shift. Its backward writes
``g_abs sign(x) + 2 g_sq x + g_sum + g_csum + 2 g_csq (x - c) + (x - c)(G + G^T)`` directly, for
the statistics some penalty differentiates. Masks multiply (``where``), they never index: shapes
never depend on data, so nothing waits for the device.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import fused as _fused

#: primitive statistics that the fused kernel computes, in block order
PRIMITIVES = ("count", "abs_sum", "sq_sum", "active", "sum", "csum", "csq", "couter")
#: derived primitive: ``count * d`` (elements of the kept positions), read from ``count``
ELEMENTS = "elements"
HEAD = ("count", "abs_sum", "sq_sum")


@dataclass(frozen=True)
class BlockSpec:
    """Which primitives a slot records, where they sit in its block, and which are differentiated."""

    d: int
    wanted: frozenset[str]  #: optional primitives present: sum, csum, csq, couter
    differentiated: frozenset[str]  #: primitives some penalty takes a gradient through
    threshold: float
    #: what the ``couter`` area holds (when a penalty wants the Gram matrix ``sum (x-c)(x-c)^T``):
    #: ``"gram"`` -- the ``d x d`` Gram matrix; ``"rows"`` (a recorded block when rows travel
    #: instead, see ``exchange``) -- ``rows`` centred rows (``rows * d`` values, zero-padded; masked
    #: positions are 0) followed by ``rows`` markers (1 for a kept position, else 0: what moves a
    #: row to another shift); ``"kernel"`` (the reduced statistics of a slot whose rows were
    #: gathered, ``global`` mode) -- the ``kernel x kernel`` matrix ``R R^T`` of the ``kernel``
    #: gathered rows ``R``, then the ``d`` column sums of squares ``diag(R^T R)``
    form: str = "gram"
    rows: int = 0  #: rows of the ``"rows"`` form (this rank's capacity)
    kernel: int = 0  #: gathered rows of the ``"kernel"`` form (``W`` times the capacity)

    def __post_init__(self) -> None:
        # plain attributes, computed once: (functools.cached_property takes a lock on Python 3.11,
        # which torch.compile cannot trace)
        object.__setattr__(self, "present", self._present())
        object.__setattr__(self, "offsets", self._offsets())
        object.__setattr__(self, "size", self._size())
        object.__setattr__(self, "centred", self._centred())

    present: tuple[str, ...] = field(init=False, repr=False, compare=False)
    offsets: dict[str, int] = field(init=False, repr=False, compare=False)
    size: int = field(init=False, repr=False, compare=False)
    centred: bool = field(init=False, repr=False, compare=False)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in HEAD:
            return ()
        if name == "couter":
            if self.form == "rows":
                return (self.rows * (self.d + 1),)
            if self.form == "kernel":
                return (self.kernel * self.kernel + self.d,)
            return (self.d, self.d)
        return (self.d,)

    def _present(self) -> tuple[str, ...]:
        return tuple(p for p in PRIMITIVES if p in HEAD or p == "active" or p in self.wanted)

    def _offsets(self) -> dict[str, int]:
        out, at = {}, 0
        for name in self.present:
            out[name] = at
            at += math.prod(self.shape(name))
        return out

    def _size(self) -> int:
        return sum(math.prod(self.shape(p)) for p in self.present)

    def _centred(self) -> bool:
        return bool(self.wanted & {"csum", "csq", "couter"})


_COUNTS: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}


def _constant(value: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A cached 0-d tensor: the count of an unmasked activation costs no op per step.

    Not while compiling: a tensor stored from inside a traced region comes back as an output of
    that graph (attached to the step that made it), and a compiled graph folds a ``full`` anyway.
    """
    if torch.compiler.is_compiling():
        return torch.full((), float(value), dtype=dtype, device=device)
    key = (value, dtype, device)
    t = _COUNTS.get(key)
    if t is None:
        if len(_COUNTS) > 4096:
            _COUNTS.clear()
        t = _COUNTS[key] = torch.full((), float(value), dtype=dtype, device=device)
    return t


class FusedStatistics(torch.autograd.Function):
    """``block = FusedStatistics.apply(x, keep, shift, spec, acc)`` -- see the module docstring."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        keep: Tensor | None,
        shift: Tensor | None,
        spec: BlockSpec,
        acc: torch.dtype,
        row_offset: int = 0,
        fused: bool = False,
    ) -> Tensor:
        input_shape = x.shape
        ctx.fused = False
        if fused and _fusable(x, spec):
            block = _fused_forward(x, keep, shift, spec, acc)
            if block is not None:
                ctx.save_for_backward(x, keep, shift)
                ctx.spec, ctx.acc, ctx.input_shape, ctx.row_offset = spec, acc, input_shape, row_offset
                ctx.fused = True
                return block
        if x.dim() == 1:
            x = x.unsqueeze(0)
            keep = None if keep is None else keep.unsqueeze(0)
        lead = tuple(range(x.dim() - 1))
        xm = x if keep is None else torch.where(keep.unsqueeze(-1), x, 0)
        if keep is None:
            count = _constant(x.numel() // max(spec.d, 1), acc, x.device)
        else:
            count = keep.sum(dtype=acc)
        # plain element-wise passes and sums: linalg.vector_norm is several times slower on CPU
        # (ord 0 and 1) and accumulates ord 2 too coarsely there
        magnitude = xm.abs()
        abs_sum = magnitude.sum(dtype=acc)
        if spec.threshold == 0.0:  # (in place: the magnitudes are ours and summed already)
            active = magnitude.sign_().sum(lead, dtype=acc)
        else:
            active = magnitude.sub_(spec.threshold).relu_().sign_().sum(lead, dtype=acc)
        squares = (xm if xm.dtype == acc else xm.to(acc)).square()
        pieces = [torch.stack([count, abs_sum, squares.sum()]), active]
        wanted = spec.wanted
        if "sum" in wanted:
            pieces.append(xm.sum(lead, dtype=acc))
        if spec.centred:
            xc = _centred(x, keep, shift, acc)
            if "csum" in wanted:
                pieces.append(xc.sum(lead))
            if "csq" in wanted:
                pieces.append(xc.square().sum(lead))
            if "couter" in wanted and spec.form == "rows":  # rows ``row_offset...``, then markers
                flat = xc.reshape(-1)
                before, n = row_offset * spec.d, flat.numel() // max(spec.d, 1)
                pad = torch.nn.functional.pad
                pieces.append(pad(flat, (before, spec.rows * spec.d - before - flat.numel())))
                if keep is None:
                    marks = torch.ones(n, dtype=acc, device=x.device)
                else:
                    marks = keep.reshape(-1).to(acc)
                pieces.append(pad(marks, (row_offset, spec.rows - row_offset - n)))
            elif "couter" in wanted:  # the Gram goes straight into the block: no copy of d x d
                rows = xc.reshape(-1, spec.d)
                block = rows.new_empty(spec.size)
                torch.cat(pieces, out=block[: spec.offsets["couter"]])
                torch.mm(rows.mT, rows, out=block[spec.offsets["couter"] :].view(spec.d, spec.d))
                pieces = [block]
        ctx.save_for_backward(x, keep, shift)
        ctx.spec, ctx.acc, ctx.input_shape, ctx.row_offset = spec, acc, input_shape, row_offset
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None, None, None, None]:
        x, keep, shift = ctx.saved_tensors
        spec: BlockSpec = ctx.spec
        diff, at = spec.differentiated, spec.offsets
        if not diff:
            return None, None, None, None, None, None, None
        if ctx.fused:
            gf = _fused_backward(x, keep, shift, grad, spec, ctx.acc)
            if gf.shape != ctx.input_shape:  # (not a view otherwise: autograd may then add into it)
                gf = gf.view(ctx.input_shape)
            return gf, None, None, None, None, None, None
        gx: Tensor | None = None
        if "abs_sum" in diff:
            gx = x.sign().mul_(grad[1])
        if "sq_sum" in diff:
            term = x * (2 * grad[2])
            gx = term if gx is None else gx + term
        if "sum" in diff:
            term = grad[at["sum"] : at["sum"] + spec.d]
            gx = term if gx is None else gx + term
        if diff & {"csum", "csq", "couter"}:
            gc = _centred_grad(x, keep, shift, grad, spec, ctx.acc, ctx.row_offset)
            gx = gc if gx is None else gx + gc
        if gx is None:
            return None, None, None, None, None, None, None
        if diff & _TIMES_X:  # (gx is ours here: see _centred_grad)
            gx = _zero_nan_(gx)
        if keep is not None:
            gx = torch.where(keep.unsqueeze(-1), gx, 0)
        elif gx.shape != x.shape:
            gx = gx.expand(x.shape)
        if gx.dtype != x.dtype:
            gx = gx.to(x.dtype)
        if gx.shape != ctx.input_shape:
            gx = gx.reshape(ctx.input_shape)
        return gx, None, None, None, None, None, None


def _fusable(x: Tensor, spec: BlockSpec) -> bool:
    """Whether the fused kernels cover this recording: a contiguous activation of >= 2 positions
    and >= 2 units, and no Gram matrix sent as rows (shapes only: nothing is read from the device).

    Outside ``torch.compile``, not a slot with a Gram matrix either: its two ``n x d x d`` matmuls
    dominate, and the separate kernels measured no faster than the eager statistics around them
    (benchmarks/README.md); under ``torch.compile`` the fused maths is traced for every slot."""
    d = spec.d
    gram = "couter" in spec.wanted
    return (
        x.dim() >= 1
        and d >= 2
        and x.shape[-1] == d
        and x.numel() >= 2 * d
        and x.is_contiguous()
        and (not gram or (spec.form == "gram" and torch.compiler.is_compiling()))
    )


def _fused_forward(
    x: Tensor, keep: Tensor | None, shift: Tensor | None, spec: BlockSpec, acc: torch.dtype
) -> Tensor | None:
    """The block from one fused kernel (and the Gram matrix's matmul), or None when no kernel could
    be compiled; traced inline under ``torch.compile``."""
    d = spec.d
    x2 = x.reshape(-1, d)
    k2 = None if keep is None else keep.reshape(-1)
    gram = "couter" in spec.wanted
    rows_out = gram and not (shift is None and keep is None and x.dtype == acc)
    if torch.compiler.is_compiling():
        outs = _fused.forward_math(x2, k2, shift, spec, acc, rows_out)
        if not gram:
            return outs[0]
        rows = outs[1] if rows_out else x2
        return torch.cat([outs[0], (rows.mT @ rows).reshape(-1)])
    kernel = _fused.forward_kernel(spec, x2, k2, shift, acc, rows_out)
    if kernel is None:
        return None
    outs = _fused.call(kernel, x2, k2, shift)
    if not gram:
        head: Tensor = outs[0]
        return head
    rows = outs[1] if rows_out else x2
    block = rows.new_empty(spec.size)
    at = spec.offsets["couter"]
    block[:at].copy_(outs[0])
    torch.mm(rows.mT, rows, out=block[at:].view(d, d))
    return block


def _fused_backward(
    x: Tensor,
    keep: Tensor | None,
    shift: Tensor | None,
    grad: Tensor,
    spec: BlockSpec,
    acc: torch.dtype,
    incoming: Tensor | None = None,
) -> Tensor:
    """``x``'s gradient ``[n, d]`` from one fused kernel (after the Gram term's matmul), plus
    ``incoming`` (the gradient of the passed-through output, :class:`FusedThrough`) if given."""
    d = spec.d
    x2 = x.reshape(-1, d)
    k2 = None if keep is None else keep.reshape(-1)
    grad = grad.contiguous()
    if incoming is not None:
        incoming = incoming.reshape(-1, d).contiguous()
    gram: Tensor | None = None
    if "couter" in spec.differentiated:  # 2 (x - c) G is added by the kernel (G symmetric, see
        g = grad[spec.offsets["couter"] : spec.offsets["couter"] + d * d].view(d, d)  # _centred_grad)
        gram = _shifted(x2, shift, acc) @ g
    if torch.compiler.is_compiling():
        return _fused.backward_math(x2, k2, shift, grad, gram, spec, acc, incoming)
    kernel = _fused.backward_kernel(spec, x2, k2, shift, grad, gram is not None, acc, incoming)
    if kernel is None:
        return _fused.backward_math(x2, k2, shift, grad, gram, spec, acc, incoming)
    gx: Tensor = _fused.call(kernel, x2, k2, shift, grad, gram, incoming)[0]
    return gx


class FusedThrough(torch.autograd.Function):
    """``y, block = FusedThrough.apply(x, keep, shift, spec, acc)``: a module's output ``x`` passed
    through (``y`` a view of ``x``, what the module returns instead), and its statistics block.

    Backward: ``g_x = g_y + d block / d x`` in one fused kernel. With :class:`FusedStatistics` the
    statistics' gradient reaches ``x`` on its own and autograd adds it to the downstream gradient
    in a pass of its own; here the downstream gradient comes in and goes out with the term added.
    Used by module hooks only, where the fused kernels apply, outside ``torch.compile`` (inside, the
    compiler fuses the add anyway). In-place operations on the module's output stay unsupported, as
    with :class:`FusedStatistics` (which saves it): here they raise at once, in forward.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, keep: Tensor | None, shift: Tensor | None, spec: BlockSpec, acc: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        block = _fused_forward(x, keep, shift, spec, acc)
        assert block is not None  # (fused_through compiled the kernel before)
        ctx.save_for_backward(x, keep, shift)
        ctx.spec, ctx.acc = spec, acc
        ctx.set_materialize_grads(False)
        return x.view_as(x), block

    @staticmethod
    def backward(
        ctx: Any, g_y: Tensor | None, g_block: Tensor | None
    ) -> tuple[Tensor | None, None, None, None, None]:
        x, keep, shift = ctx.saved_tensors
        spec: BlockSpec = ctx.spec
        if g_block is None or not spec.differentiated:
            return g_y, None, None, None, None
        gx = _fused_backward(x, keep, shift, g_block, spec, ctx.acc, g_y)
        if gx.shape != x.shape:  # (not a view otherwise)
            gx = gx.view(x.shape)
        return gx, None, None, None, None


def fused_through(
    x: Tensor, keep: Tensor | None, shift: Tensor | None, spec: BlockSpec, acc: torch.dtype
) -> tuple[Tensor, Tensor] | None:
    """``(y, block)`` of :class:`FusedThrough` for a module's output ``x``, or None where the fused
    kernels do not apply (the caller then records through :func:`fused_statistics`)."""
    if torch.compiler.is_compiling() or not spec.differentiated or not _fusable(x, spec):
        return None
    if shift is not None and (shift.device != x.device or shift.dtype != acc):
        shift = shift.to(device=x.device, dtype=acc)
    x2 = x.reshape(-1, spec.d)
    k2 = None if keep is None else keep.reshape(-1)
    gram = "couter" in spec.wanted
    rows_out = gram and not (shift is None and keep is None and x.dtype == acc)
    if _fused.forward_kernel(spec, x2, k2, shift, acc, rows_out) is None:
        return None
    with no_autocast(x):
        y, block = FusedThrough.apply(x, keep, shift, spec, acc)
    return y, block


@dataclass(frozen=True)
class Through:
    """The two compiled kernels of a module output's statistics, bound once per layout: what the
    recorder's fast path (:class:`KernelThrough`) calls with no lookup."""

    spec: BlockSpec
    acc: torch.dtype
    forward: _fused.Kernel  #: ``forward(x2) -> (block,)``
    backward: _fused.Kernel  #: ``backward(x2, g_block, g_y2) -> (g_x2,)``


def through_kernels(x: Tensor, spec: BlockSpec, acc: torch.dtype) -> Through | None:
    """The kernels of :class:`KernelThrough` for an unmasked, uncentred recording shaped like ``x``
    (compiled now if they were not), or None where they do not apply."""
    if spec.centred or not spec.differentiated or not _fusable(x, spec):
        return None
    x2 = x.reshape(-1, spec.d)
    fwd = _fused.forward_kernel(spec, x2, None, None, acc, False)
    grad = x2.new_empty(spec.size, dtype=acc)
    bwd = _fused.backward_kernel(spec, x2, None, None, grad, False, acc, x2)
    if fwd is None or bwd is None:
        return None
    return Through(spec, acc, fwd, bwd)


class KernelThrough(torch.autograd.Function):
    """``y, block = KernelThrough.apply(x, through)``: :class:`FusedThrough` for an unmasked,
    uncentred module output, with its kernels bound (:class:`Through`): the per-layer fast path.

    Forward: one kernel call (``block``) and a view of ``x`` (``y``); backward: one kernel call
    ``g_x = g_y + d block / d x``. No shift, no mask, no per-call lookup."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, through: Through) -> tuple[Tensor, Tensor]:
        (block,) = through.forward(x.view(-1, through.spec.d))
        ctx.save_for_backward(x)
        ctx.through = through
        ctx.set_materialize_grads(False)
        return x.view_as(x), block

    @staticmethod
    def backward(ctx: Any, g_y: Tensor | None, g_block: Tensor | None) -> tuple[Tensor | None, None]:
        if g_block is None:
            return g_y, None
        (x,) = ctx.saved_tensors
        through: Through = ctx.through
        d = through.spec.d
        if g_y is None or g_block.dtype != through.acc:  # (not met in a training step)
            gx = _fused_backward(x, None, None, g_block, through.spec, through.acc, g_y)
        else:
            (gx,) = through.backward(x.view(-1, d), g_block.contiguous(), g_y.reshape(-1, d).contiguous())
        return gx.view(x.shape), None


#: primitives whose gradient multiplies the activation: where it is inf or NaN, a failed step's
#: zero gradient makes ``0 * inf = NaN`` there (``sign(x)`` is finite, so ``abs_sum``'s is clean)
_TIMES_X = frozenset({"sq_sum", "csq", "couter"})
_INF = float("inf")


def _zero_nan_(t: Tensor) -> Tensor:
    """``t`` with its NaN set to 0, in place; infinities are kept (one fused op).

    The gradient reaching the statistics of a failed step is 0 (see ``values.Gathered``); only a
    product with a non-finite activation makes it NaN, and only such a step has one: a non-finite
    kept activation makes the global statistics non-finite, and so the step fail.
    """
    return t.nan_to_num_(nan=0.0, posinf=_INF, neginf=-_INF)


class FiniteGradient(torch.autograd.Function):
    """``y = FiniteGradient.apply(x)``: ``x`` in forward; backward sets the NaN of the gradient to 0.

    Put between an activation and penalties that record their own statistics through autograd
    (``LoadBalance``'s softmax, ``ZLoss``'s logsumexp, ``TAR``'s differences, user penalties): the
    gradient of a failed step is 0, but their backward turns it into NaN where the activation is
    inf or NaN (``softmax(inf) = NaN``, ``0 * inf = NaN``). One op per slot in backward.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return torch.nan_to_num(grad, nan=0.0, posinf=_INF, neginf=-_INF)


def _shifted(x: Tensor, shift: Tensor | None, acc: torch.dtype) -> Tensor:
    """``x - shift`` in the accumulation dtype (``x`` itself when there is no shift)."""
    return x.to(acc) if shift is None else x - shift


def _centred(x: Tensor, keep: Tensor | None, shift: Tensor | None, acc: torch.dtype) -> Tensor:
    """The rows the centred statistics sum: ``x - shift``, masked positions set to 0."""
    xc = _shifted(x, shift, acc)
    if keep is not None:
        xc = torch.where(keep.unsqueeze(-1), xc, 0)
    return xc


def _centred_grad(
    x: Tensor,
    keep: Tensor | None,
    shift: Tensor | None,
    grad: Tensor,
    spec: BlockSpec,
    acc: torch.dtype,
    row_offset: int,
) -> Tensor:
    d, at, diff = spec.d, spec.offsets, spec.differentiated
    xc = _shifted(x, shift, acc)  # the mask is applied to the whole gradient by the caller
    gx: Tensor | None = None
    if "csum" in diff:
        gx = grad[at["csum"] : at["csum"] + d]
    if "csq" in diff:
        term = xc * (2 * grad[at["csq"] : at["csq"] + d])
        gx = term if gx is None else gx + term
    if "couter" in diff and spec.form == "rows":  # the exchange turned the Gram's gradient into the rows'
        start = at["couter"] + row_offset * d
        term = grad[start : start + xc.numel()].view(xc.shape)
        gx = term.clone() if gx is None else gx + term  # (ours: the caller zeroes its NaN in place)
    elif "couter" in diff:
        # d(x^T x)/dx applied to G is x (G + G^T); the built-in Gram penalties (DeCov, Covariance)
        # are functions of the symmetric covariance through all its entries alike, so G is
        # symmetric and this is 2 x G (a transposed add costs as much as the matmul on a CPU)
        g = grad[at["couter"] : at["couter"] + d * d].view(d, d)
        term = (xc @ g).mul_(2)
        gx = term if gx is None else gx + term
    assert gx is not None
    return gx


def fused_statistics(
    x: Tensor,
    keep: Tensor | None,
    shift: Tensor | None,
    spec: BlockSpec,
    acc: torch.dtype,
    row_offset: int = 0,
    fused: bool = False,
) -> Tensor:
    """The primitive part of a slot's block for activation ``x`` (``[..., d]``); in rows mode its
    rows go to rows ``row_offset ...`` of the block's row area. ``fused``: through the generated
    kernels of :mod:`actreg.fused` where they apply."""
    if shift is not None and (shift.device != x.device or shift.dtype != acc):
        shift = shift.to(device=x.device, dtype=acc)
    with no_autocast(x):
        block: Tensor = FusedStatistics.apply(x, keep, shift, spec, acc, row_offset, fused)
    return block


def no_autocast(x: Tensor) -> contextlib.AbstractContextManager[Any]:
    """Autocast off for statistics of ``x`` (a no-op context, cheaper, when it is off already)."""
    if _autocast_enabled(x.device.type):
        return torch.autocast(device_type=x.device.type, enabled=False)
    return contextlib.nullcontext()


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 spells it per device
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()


class TemporalDifferences(torch.autograd.Function):
    """``[sum (x_t - x_{t-1})^2, number of difference elements]`` along ``time_dim`` (TAR).

    A difference counts when both of its positions are kept. Saves ``x`` and the mask only; the
    backward recomputes the differences.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, keep: Tensor | None, time_dim: int, acc: torch.dtype
    ) -> Tensor:
        diff, pairs = _differences(x, keep, time_dim, acc)
        if pairs is None:
            n = _constant(diff.numel(), acc, x.device)
        else:
            n = pairs.sum(dtype=acc) * x.shape[-1]
        ctx.save_for_backward(x, keep)
        ctx.time_dim, ctx.acc = time_dim, acc
        return torch.stack([diff.square().sum(), n])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        x, keep = ctx.saved_tensors
        td = ctx.time_dim
        diff, _ = _differences(x, keep, td, ctx.acc)
        gd = diff * (2 * grad[0])
        steps = x.shape[td]
        gx = torch.zeros(x.shape, dtype=ctx.acc, device=x.device)
        gx.narrow(td, 1, steps - 1).add_(gd)
        gx.narrow(td, 0, steps - 1).sub_(gd)
        return gx.to(x.dtype), None, None, None


def _differences(x: Tensor, keep: Tensor | None, td: int, acc: torch.dtype) -> tuple[Tensor, Tensor | None]:
    steps = x.shape[td]
    diff = x.narrow(td, 1, steps - 1).to(acc) - x.narrow(td, 0, steps - 1).to(acc)
    if keep is None:
        return diff, None
    pairs = keep.narrow(td, 1, steps - 1) & keep.narrow(td, 0, steps - 1)
    return torch.where(pairs.unsqueeze(-1), diff, 0.0), pairs


def temporal_differences(x: Tensor, keep: Tensor | None, time_dim: int, acc: torch.dtype) -> Tensor:
    """TAR's statistics of ``x`` (see :class:`TemporalDifferences`), autocast disabled."""
    with no_autocast(x):
        stats: Tensor = TemporalDifferences.apply(x, keep, time_dim, acc)
    return stats
