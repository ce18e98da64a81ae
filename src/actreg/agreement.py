"""The one-time agreement of the first ``loss()``: same layout on every rank, sizes, dtype, shifts.

Each rank proposes what it built and saw (:class:`Proposal`); one ``all_gather_object`` gives every
rank every proposal, so every rank takes the same decision: raise a :class:`LayoutMismatchError`
naming the differences, or adopt the agreed feature sizes, statistics dtype and first shifts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import LayoutMismatchError
from .exchange import Exchange
from .layout import Layout, describe_differences


@dataclass(frozen=True)
class Proposal:
    description: dict[str, object]  #: settings and slots (``repr`` of every penalty)
    dims: list[int | None]  #: feature size each slot was recorded with on this rank
    dtype: str  #: statistics dtype this rank would use
    shifts: dict[int, tuple[float, list[float]]] = field(default_factory=dict)  #: (count, own shift)


@dataclass(frozen=True)
class Agreement:
    dims: dict[int, int]
    dtype: torch.dtype
    first_shifts: dict[int, Tensor]


def agree(exchange: Exchange, mine: Proposal, communicate: bool, layout: Layout) -> Agreement:
    """Every rank's proposal, compared; raises the same error on every rank if they differ."""
    everyone: list[Proposal] = exchange.gather_objects(mine) if communicate else [mine]  # type: ignore[assignment]
    descriptions = [p.description for p in everyone]
    if any(d != descriptions[0] for d in descriptions):
        raise LayoutMismatchError(
            f"[actreg, {exchange.who}] ranks built different ActivityRegularizers; the same "
            "patterns, penalties and settings are needed on every rank of the group:\n"
            + describe_differences(descriptions)
        )
    dims: dict[int, int] = {}
    for index, slot in enumerate(layout.slots):
        seen = {p.dims[index] for p in everyone} - {None}
        if len(seen) > 1:
            by_rank = {r: p.dims[index] for r, p in enumerate(everyone) if p.dims[index] is not None}
            raise LayoutMismatchError(
                f"[actreg, {exchange.who}] {slot.name!r} has different feature sizes on different "
                f"ranks: {by_rank}"
            )
        if seen:
            dims[index] = seen.pop()  # type: ignore[assignment]
    dtype = torch.float32
    for p in everyone:
        dtype = torch.promote_types(dtype, getattr(torch, p.dtype.replace("torch.", "")))
    # first step of centred slots: the count-weighted mean of the ranks' own shifts
    per_slot: dict[int, list[tuple[float, list[float]]]] = {}
    for p in everyone:
        for i, entry in p.shifts.items():
            per_slot.setdefault(i, []).append(entry)
    first: dict[int, Tensor] = {}
    for i, entries in per_slot.items():
        total = sum(n for n, _ in entries)
        if total > 0 and all(len(c) == dims.get(i) for _, c in entries):
            weighted = sum(n * torch.tensor(c, dtype=torch.float64) for n, c in entries) / total
            first[i] = weighted.to(dtype)  # type: ignore[union-attr]
    return Agreement(dims, dtype, first)


def resolve_dims(exchange: Exchange, layout: Layout, seen: dict[int, int], device: torch.device) -> None:
    """Agree on the feature sizes of slots that had not run on any rank before this step.

    Only called while such slots exist; the set is identical on all ranks by construction, so the
    small ``all_reduce(MAX)`` always has a partner (this step then has two collectives).
    """
    unresolved = [i for i, d in enumerate(layout.dims) if d is None]
    big = 2**40
    sizes = [seen.get(i) for i in unresolved]
    t = torch.tensor([d or 0 for d in sizes] + [-(d or big) for d in sizes], dtype=torch.int64, device=device)
    exchange.max_(t)
    k = len(unresolved)
    top, low = t[:k].tolist(), (-t[k:]).tolist()
    for i, hi, lo in zip(unresolved, top, low, strict=True):
        if hi == 0:
            continue
        if hi != lo:
            raise LayoutMismatchError(
                f"[actreg, {exchange.who}] {layout.slots[i].name!r} has different feature sizes "
                f"on different ranks (between {lo} and {hi})"
            )
        layout.set_dim(i, hi)
