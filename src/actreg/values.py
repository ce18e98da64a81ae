"""Penalty values of a whole step, evaluated per *group* of alike penalties, not per slot.

Built-in penalties write :meth:`Penalty.value` for statistics with a leading batch dimension and
are linear in their weight, so every slot with the same kind of penalty, the same feature size and
the same other hyperparameters is evaluated in one call: each statistic of the group is a strided
view of the step buffer (alike slots sit evenly spaced; a gather otherwise), the backward writes all
their gradients into one zero buffer (:class:`Gathered`), and the value's few element-wise ops run
once for all slots. User penalties form groups of one. The cost of a step's values thus grows with
the number of *kinds* of penalty, not of layers.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .compiled_values import CompiledValues, ValueKernels, build, fits, lock
from .layout import Layout
from .penalty import BATCH_COUNT, Penalty


@dataclass
class Group:
    """Alike penalties of several slots, evaluated together."""

    penalty: Penalty  #: evaluates the whole group (unit scale when the members' scales differ)
    members: list[tuple[int, str]]  #: (slot index, label)
    stats: list[tuple[str, tuple[int, ...], float]]  #: (name, shape, read scale)
    offsets: list[list[int]]  #: per statistic, where each member's copy starts in the buffer
    scales: list[float] | None  #: per-member scales when they differ
    batched: bool

    @property
    def k(self) -> int:
        return len(self.members)


def _scale_of(p: Penalty) -> float:
    return float(getattr(p, p._scale, 1.0))


def _key(p: Penalty, d: int, slot_index: int, label: str) -> tuple[object, ...]:
    if not p._batchable or not hasattr(p, p._scale):
        return ("own", slot_index, label)
    others = tuple((k, v) for k, v in p.hyperparameters().items() if k != p._scale)
    return (type(p), d, others)


def build_groups(layout: Layout) -> list[Group]:
    """Group every penalty of every slot with a known size; groups keep first-appearance order."""
    groups: dict[tuple[object, ...], Group] = {}
    for index, slot in enumerate(layout.slots):
        d = layout.dims[index]
        if d is None:
            continue
        for label, p in zip(slot.labels, slot.penalties, strict=True):
            key = (*_key(p, d, index, label), layout.kernels.get(index, 0))  # (a kernel's size too)
            where = layout.where(index, label)
            if key not in groups:
                stats = [(name, w.shape, w.scale) for name, w in where.items()]
                groups[key] = Group(p, [], stats, [[] for _ in stats], None, key[0] != "own")
            group = groups[key]
            group.members.append((index, label))
            for offsets, (name, _, _) in zip(group.offsets, group.stats, strict=True):
                offsets.append(where[name].offset)
    for group in groups.values():
        scales = [
            _scale_of(layout.slots[i].penalties[layout.slots[i].labels.index(lab)])
            for i, lab in group.members
        ]
        if len(set(scales)) > 1:
            group.scales = scales
            group.penalty = copy.copy(group.penalty)
            setattr(group.penalty, group.penalty._scale, 1.0)
    return list(groups.values())


#: the most differentiated statistics (values) :meth:`Evaluator.compiled_total` compiles for. Larger
#: ones are Gram matrices: inductor's backward of their strided reads takes several passes over the
#: whole buffer (8 x 512 x 512 DeCov: 8 ms against the eager path's 5), so they stay eager
COMPILED_READS = 1 << 16


class Evaluator:
    """The groups' reads of the step buffer, planned once per layout.

    Statistics no gradient flows through (counts, top-k assignments: ``Penalty._constant``) are
    read without autograd.
    """

    def __init__(self, groups: list[Group], device: torch.device, dtype: torch.dtype) -> None:
        self.groups = groups
        self._plans = [_Plan(g, device, dtype) for g in groups]
        self._reads = tuple(r for plan in self._plans for r in plan.diff_reads)
        _mark_overlaps(self._reads)
        #: :meth:`compiled_total`'s kernels: None until first asked, False where they cannot compile
        self._compiled: ValueKernels | bool | None = None

    def compiled_total(
        self, stats: Tensor, batch_scale: Tensor | None, ok: Tensor, window: Tensor | None = None
    ) -> tuple[Tensor, Tensor] | None:
        """``(where(ok', total, 0), ok')`` with ``ok' = ok & isfinite(total)``, through the
        generated kernels of :mod:`actreg.compiled_values` (one in forward, one in backward);
        None where they do not apply (the caller evaluates eagerly: :meth:`total`): more than
        ``COMPILED_READS`` differentiated values, a failed compilation, other inputs."""
        if self._compiled is None:
            with lock:  # (Join's shadow steps run in threads)
                if self._compiled is None:
                    size = sum(r.numel * (r.shape[0] if r.batched else 1) for r in self._reads)
                    built = None
                    if size <= COMPILED_READS:
                        built = build(self._plain_sum, stats, ok, batch_scale, window)
                    self._compiled = built if built is not None else False
        kernels = self._compiled
        if kernels is False or not fits(kernels, stats, batch_scale, window):  # type: ignore[arg-type]
            return None
        out: tuple[Tensor, Tensor] = CompiledValues.apply(stats, ok, batch_scale, window, kernels)
        return out

    def total(
        self,
        stats: Tensor,
        batch_scale: Tensor | None,
        ok: Tensor | None = None,
        window: Tensor | None = None,
    ) -> Tensor:
        """The sum of every penalty (a 0-d tensor).

        ``window``: the reduced statistics of the accumulation window so far (the layout of
        ``stats``, no gradient), read as ``window_<name>`` by penalties with ``_windowed`` names.

        With ``ok`` given, the gradient that reaches ``stats`` is zero where ``ok`` is False, even
        when the statistics were not finite (the values' own backward may then produce NaN).
        """
        diff = Gathered.apply(stats, ok, self._reads) if self._reads else ()
        return self._sum(stats, diff, batch_scale, window)

    def _sum(
        self, stats: Tensor, diff: Sequence[Tensor], batch_scale: Tensor | None, window: Tensor | None
    ) -> Tensor:
        """The sum of every plan's values, with ``diff`` the differentiated reads of all plans in
        order (``Gathered``'s views eagerly, plain views in the compiled values' trace)."""
        frozen = stats.detach()  # (a view taken under no_grad would still require grad)
        total: Tensor | None = None
        at = 0
        for plan in self._plans:
            n = len(plan.diff_reads)
            v = plan.values(frozen, list(diff[at : at + n]), batch_scale, window)
            at += n
            v = v.sum() if v.dim() else v
            total = v if total is None else total + v
        return stats.new_zeros(()) if total is None else total

    def _plain_sum(self, stats: Tensor, batch_scale: Tensor | None, window: Tensor | None) -> Tensor:
        """:meth:`_sum` reading the differentiated statistics as plain views of ``stats``: what
        :mod:`actreg.compiled_values` traces (its backward masks the failed step itself)."""
        return self._sum(stats, [r.view(stats) for r in self._reads], batch_scale, window)

    def values(self, stats: Tensor, batch_scale: Tensor | None, window: Tensor | None = None) -> Tensor:
        """The value of every penalty, in the order of :meth:`order` (``[P]``), without autograd."""
        with torch.no_grad():
            out = [
                plan.values(stats, [r.view(stats) for r in plan.diff_reads], batch_scale, window).reshape(-1)
                for plan in self._plans
            ]
        return torch.cat(out) if out else stats.new_zeros(0)

    def order(self) -> list[tuple[int, str]]:
        """(slot index, label) of each entry of :meth:`values`."""
        return [m for g in self.groups for m in g.members]


@dataclass
class _Read:
    """One statistic of the ``k`` members of a group: ``shape`` values at each of ``offsets``.

    Read as a strided view when the offsets are evenly spaced (alike slots in a row), else gathered.
    """

    offsets: list[int]
    shape: tuple[int, ...]  #: ``(k, *stat shape)`` for batched groups, the statistic's shape else
    batched: bool
    device: torch.device
    overlaps: bool = False  #: shares positions with an earlier read (its gradient must add)

    def __post_init__(self) -> None:
        stat_shape = self.shape[1:] if self.batched else self.shape
        self.numel = math.prod(stat_shape)  #: of one member's statistic
        steps = {b - a for a, b in itertools.pairwise(self.offsets)}
        #: gather positions when the members are unevenly spaced, else None (a strided view)
        self.index: Tensor | None = None
        if len(steps) > 1 or 0 in steps:  # unevenly spaced, or one slot twice (L1 + L1): gather
            starts = torch.tensor(self.offsets, dtype=torch.long, device=self.device)
            self.index = (starts[:, None] + torch.arange(self.numel, device=self.device)).reshape(-1)
        inner = [math.prod(stat_shape[i + 1 :]) for i in range(len(stat_shape))]
        stride = steps.pop() if len(steps) == 1 else self.numel
        self._strides = (stride, *inner) if self.batched else tuple(inner)

    def view(self, buffer: Tensor) -> Tensor:
        if self.index is not None:
            return buffer.index_select(0, self.index).view(self.shape)
        return buffer.as_strided(self.shape, self._strides, buffer.storage_offset() + self.offsets[0])

    def write(self, buffer: Tensor, grad: Tensor, ok: Tensor | None) -> None:
        """Put ``grad`` (of :meth:`view`) into ``buffer`` (contiguous, offset 0); zeros where ``ok``
        is False (``where``, so that a NaN gradient of a failed step does not get through)."""
        if self.index is not None or self.overlaps:
            if ok is not None:
                grad = torch.where(ok, grad, 0.0)
            if self.index is not None:
                buffer.index_add_(0, self.index, grad.reshape(-1))
            else:
                buffer.as_strided(self.shape, self._strides, self.offsets[0]).add_(grad)
            return
        target = buffer.as_strided(self.shape, self._strides, self.offsets[0])
        if ok is None:
            target.copy_(grad)
        else:  # one pass: select straight into the buffer
            torch.where(ok, grad, buffer.new_zeros(()), out=target)


def _mark_overlaps(reads: tuple[_Read, ...]) -> None:
    spans: list[tuple[int, int]] = []
    for r in reads:
        mine = [(o, o + r.numel) for o in r.offsets]
        r.overlaps = any(a < d and c < b for a, b in mine for c, d in spans)
        spans.extend(mine)


class Gathered(torch.autograd.Function):
    """``parts = Gathered.apply(stats, ok, reads)``: views of the step buffer (no copy when alike
    slots sit evenly spaced). Backward writes every part's gradient into one zero buffer -- zero
    wherever ``ok`` is False, so no NaN of a failed step flows back to the activations."""

    @staticmethod
    def forward(ctx: Any, stats: Tensor, ok: Tensor | None, reads: tuple[_Read, ...]) -> tuple[Tensor, ...]:
        ctx.reads, ctx.numel = reads, stats.numel()
        ctx.save_for_backward(ok)
        return tuple(r.view(stats) for r in reads)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor, None, None]:
        (ok,) = ctx.saved_tensors
        buffer: Tensor | None = None
        for read, g in zip(ctx.reads, grads, strict=True):
            if g is None:
                continue
            if buffer is None:
                buffer = g.new_zeros(ctx.numel)
            read.write(buffer, g, ok)
        assert buffer is not None
        return buffer, None, None


class _Plan:
    def __init__(self, group: Group, device: torch.device, dtype: torch.dtype) -> None:
        self.group = group
        constant = group.penalty._constant
        self.kinds: list[bool] = []  # per statistic: constant?
        self.diff_reads: list[_Read] = []
        self.const_reads: list[_Read] = []
        windowed: frozenset[str] = getattr(group.penalty, "_windowed", frozenset())
        self.window_reads: list[tuple[str, _Read, float]] = []  #: (name, read, scale) of the window
        for (name, shape, scale), offsets in zip(group.stats, group.offsets, strict=True):
            read = _Read(offsets, (group.k, *shape) if group.batched else tuple(shape), group.batched, device)
            (self.const_reads if name in constant else self.diff_reads).append(read)
            self.kinds.append(name in constant)
            if name in windowed:
                self.window_reads.append((name, read, scale))
        self.scales = None if group.scales is None else torch.tensor(group.scales, dtype=dtype, device=device)

    def values(
        self, stats: Tensor, diff: list[Tensor], batch_scale: Tensor | None, window: Tensor | None = None
    ) -> Tensor:
        group = self.group
        const = [r.view(stats) for r in self.const_reads]  # `stats` carries no gradient here
        s: dict[str, Tensor] = {}
        for (name, _, read_scale), is_const in zip(group.stats, self.kinds, strict=True):
            t = (const if is_const else diff).pop(0)
            s[name] = t if read_scale == 1.0 else t * read_scale
        for name, read, read_scale in self.window_reads:  # windowed penalties need a window
            if window is None:
                raise RuntimeError(f"{group.penalty!r} reads the accumulation window, which was not given")
            w = read.view(window)
            s["window_" + name] = w if read_scale == 1.0 else w * read_scale
        if batch_scale is not None and "count" in s:
            s[BATCH_COUNT] = s["count"] * batch_scale
        v = group.penalty.value(s)
        if not group.batched:
            v = v.reshape(1).to(stats.dtype)
        return v if self.scales is None else v * self.scales
