"""Penalty values of a whole step, evaluated per *group* of alike penalties, not per slot.

Built-in penalties write :meth:`Penalty.value` for statistics with a leading batch dimension and
are linear in their weight, so every slot with the same kind of penalty, the same feature size and
the same other hyperparameters is evaluated in one call: one ``index_select`` gathers the group's
statistics from the flat buffer (its backward is one ``index_add``), one ``split`` hands them out,
and the value's few element-wise ops run once for all slots. User penalties form groups of one.
The cost of a step's values thus grows with the number of *kinds* of penalty, not of layers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from .layout import Layout, Where
from .penalty import BATCH_COUNT, Penalty


@dataclass
class Group:
    """Alike penalties of several slots, evaluated together."""

    penalty: Penalty  #: evaluates the whole group (unit scale when the members' scales differ)
    members: list[tuple[int, str]]  #: (slot index, label)
    stats: list[tuple[str, tuple[int, ...], float]]  #: (name, shape, read scale)
    index: list[int]  #: buffer positions, statistic-major then member
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
    places: dict[tuple[object, ...], list[dict[str, Where]]] = {}
    for index, slot in enumerate(layout.slots):
        d = layout.dims[index]
        if d is None:
            continue
        for label, p in zip(slot.labels, slot.penalties, strict=True):
            key = _key(p, d, index, label)
            where = layout.where(index, label)
            if key not in groups:
                stats = [(name, w.shape, w.scale) for name, w in where.items()]
                groups[key] = Group(p, [], stats, [], None, key[0] != "own")
                places[key] = []
            groups[key].members.append((index, label))
            places[key].append(where)
    for key, group in groups.items():
        for name, _, _ in group.stats:
            for where in places[key]:
                w = where[name]
                group.index.extend(range(w.offset, w.offset + w.numel))
        scales = [
            _scale_of(layout.slots[i].penalties[layout.slots[i].labels.index(lab)])
            for i, lab in group.members
        ]
        if len(set(scales)) > 1:
            group.scales = scales
            group.penalty = copy.copy(group.penalty)
            setattr(group.penalty, group.penalty._scale, 1.0)
    return list(groups.values())


class Evaluator:
    """Device tensors of the groups (gather indices, scales), built once per layout.

    Statistics that no gradient flows through (counts, top-k assignments: ``Penalty._constant``)
    are gathered without autograd, so backward spends nothing on them.
    """

    def __init__(self, groups: list[Group], device: torch.device, dtype: torch.dtype) -> None:
        self.groups = groups
        self._plans = [_Plan(g, device, dtype) for g in groups]

    def total(self, stats: Tensor, batch_scale: Tensor | None) -> Tensor:
        """The sum of every penalty (a 0-d tensor)."""
        total: Tensor | None = None
        for plan in self._plans:
            v = plan.values(stats, batch_scale)
            v = v.sum() if v.dim() else v
            total = v if total is None else total + v
        return stats.new_zeros(()) if total is None else total

    def values(self, stats: Tensor, batch_scale: Tensor | None) -> Tensor:
        """The value of every penalty, in the order of :meth:`order` (``[P]``)."""
        out = [plan.values(stats, batch_scale).reshape(-1) for plan in self._plans]
        return torch.cat(out) if out else stats.new_zeros(0)

    def order(self) -> list[tuple[int, str]]:
        """(slot index, label) of each entry of :meth:`values`."""
        return [m for g in self.groups for m in g.members]


class _Plan:
    def __init__(self, group: Group, device: torch.device, dtype: torch.dtype) -> None:
        self.group = group
        constant = group.penalty._constant
        per_stat = len(group.index) // max(sum(_numel(shape) for _, shape, _ in group.stats), 1)
        assert per_stat == group.k
        self.kinds: list[bool] = []  # per statistic: constant?
        diff_index: list[int] = []
        const_index: list[int] = []
        at = 0
        for name, shape, _ in group.stats:
            n = group.k * _numel(shape)
            (const_index if name in constant else diff_index).extend(group.index[at : at + n])
            self.kinds.append(name in constant)
            at += n
        self.diff = torch.tensor(diff_index, dtype=torch.long, device=device) if diff_index else None
        self.const = torch.tensor(const_index, dtype=torch.long, device=device) if const_index else None
        sizes = [group.k * _numel(shape) for _, shape, _ in group.stats]
        self.diff_sizes = [n for n, c in zip(sizes, self.kinds, strict=True) if not c]
        self.const_sizes = [n for n, c in zip(sizes, self.kinds, strict=True) if c]
        self.scales = None if group.scales is None else torch.tensor(group.scales, dtype=dtype, device=device)

    def values(self, stats: Tensor, batch_scale: Tensor | None) -> Tensor:
        group = self.group
        diff = _gather(stats, self.diff, self.diff_sizes)
        with torch.no_grad():
            const = _gather(stats, self.const, self.const_sizes)
        s: dict[str, Tensor] = {}
        for (name, shape, read_scale), is_const in zip(group.stats, self.kinds, strict=True):
            part = (const if is_const else diff).pop(0)
            t = part.view(group.k, *shape) if group.batched else part.view(shape)
            s[name] = t if read_scale == 1.0 else t * read_scale
        if batch_scale is not None and "count" in s:
            s[BATCH_COUNT] = s["count"] * batch_scale
        v = group.penalty.value(s)
        if not group.batched:
            v = v.reshape(1).to(stats.dtype)
        return v if self.scales is None else v * self.scales


def _gather(stats: Tensor, index: Tensor | None, sizes: list[int]) -> list[Tensor]:
    if index is None:
        return []
    flat = stats.index_select(0, index)
    return [flat] if len(sizes) == 1 else list(flat.split(sizes))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
