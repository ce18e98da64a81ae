"""The one-time agreement of the first ``loss()``: same layout on every rank, sizes, dtype, shifts.

Each rank proposes what it built and saw (:class:`Proposal`); one ``all_gather_object`` gives every
rank every proposal, so every rank takes the same decision: raise a :class:`LayoutMismatchError`
naming the differences, or adopt the agreed feature sizes, statistics dtype and first shifts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .errors import LayoutMismatchError
from .exchange import Exchange, prepare_rows
from .layout import Layout, describe_differences
from .weights import summed_ranks

if TYPE_CHECKING:
    from .recording import Records
    from .regularizer import ActivityRegularizer
    from .shifts import Shifts


@dataclass(frozen=True)
class Proposal:
    description: dict[str, object]  #: settings and slots (``repr`` of every penalty)
    dims: list[int | None]  #: feature size each slot was recorded with on this rank
    dtype: str  #: statistics dtype this rank would use
    shifts: dict[int, tuple[float, list[float]]] = field(default_factory=dict)  #: (count, own shift)
    positions: dict[int, int] = field(default_factory=dict)  #: rows recorded per slot (masked too)
    loaded_dims: list[tuple[int, int]] = field(default_factory=list)  #: of a loaded state (slot, d)


@dataclass(frozen=True)
class Agreement:
    dims: dict[int, int]
    dtype: torch.dtype
    first_shifts: dict[int, Tensor]
    rows: dict[int, int]  #: slots whose Gram matrix travels as rows -> rows per rank


def settle(reg: ActivityRegularizer, records: Records) -> tuple[Exchange, bool]:
    """Before a step's exchange: agree across ranks (first call), or, on later calls, resolve the
    sizes of slots that had never run and the first shifts of pending centred slots (each only
    while any). Returns the exchange and whether the step communicates."""
    ex = reg._get_exchange()
    communicate = reg.mode.communicates and ex.world_size > 1
    layout = reg.layout
    first_call = not reg._agreed
    if first_call:
        # in every mode, ``local`` included: ranks that differ in any setting must fail together
        # here rather than meet in mismatched collectives later
        agreement = agree(ex, propose(reg, records), communicate, layout)
        for index, d in agreement.dims.items():
            layout.set_dim(index, d)
        reg._dtype_floor = agreement.dtype
        # no activation recorded on any rank yet: their dtype is agreed when one is (resolve_dims)
        reg.recorder.dtype = agreement.dtype if agreement.dims or reg.stats_dtype else None
        reg.shifts.first = agreement.first_shifts
        reg._agreed = True
        if reg.mode.moving_average:  # the average is d x d: this step sends the Gram, later ones rows
            reg._next_rows = agreement.rows
        else:  # rows already in this step (recorded as such, see Layout.open_rows), kept as a kernel
            layout.rows = dict(agreement.rows)
            layout.kernels = {i: ex.world_size * capacity for i, capacity in agreement.rows.items()}
    elif communicate and not layout.complete:
        widest = resolve_dims(ex, layout, reg.recorder.seen, reg._dtype_device(ex)[1], _bits(records))
        if reg.recorder.dtype is None and widest:
            reg.recorder.dtype = torch.promote_types(reg._dtype_floor, _DTYPE_OF_BITS[widest])
    if not communicate:
        for index, d in reg.recorder.seen.items():
            layout.set_dim(index, d)
        if reg.recorder.dtype is None and records.blocks:
            reg.recorder.dtype = torch.promote_types(reg._dtype_floor, _DTYPE_OF_BITS[_bits(records)])
    layout.build()
    if not first_call:
        pending = reg.shifts.pending()
        if pending:
            dtype, device = reg._dtype_device(ex)
            reg.shifts.first = agree_shifts(ex, communicate, pending, records, reg.shifts, device, dtype)
    prepare_rows(records.blocks, layout, reg.shifts)  # (rows recorded before the size was agreed)
    return ex, communicate


def propose(reg: ActivityRegularizer, records: Records) -> Proposal:
    """What this rank built and saw in its first step."""
    ex = reg._get_exchange()
    dtype = reg.stats_dtype or torch.float32
    for b in records.blocks.values():
        dtype = torch.promote_types(dtype, b.dtype)
    if reg.weights is not None:  # weight sums travel in the same buffer
        for t in reg.weights.parameters():
            dtype = torch.promote_types(dtype, t.dtype)
    if reg.stats_dtype is None:  # a loaded moving average keeps its precision
        for stats in reg.ema.state().values():
            for by_name in stats.values():
                for t in by_name.values():
                    dtype = torch.promote_types(dtype, t.dtype)
    shifts = {
        i: (float(records.blocks[i][0].detach()), s.detach().double().cpu().tolist())
        for i, s in reg.shifts.local_shifts().items()
        if i in records.blocks
    }
    description = {
        "sync": reg.sync,
        "nonfinite": reg.nonfinite,
        "record_eval": reg.record_eval,
        "decay": reg.decay if reg.mode.moving_average else None,
        "grad_scale": reg.grad_scale,
        "stats_dtype": str(reg.stats_dtype),
        "activity_threshold": reg.activity_threshold,
        "slots": reg.layout.describe(),
        "weights": (  # which parameters (names, global shapes, placements), not only how many
            reg.weights.describe(summed_ranks(ex.group, reg.mode.communicates), ex.who, reg.sync)
            if reg.weights is not None
            else None
        ),
        # a loaded state's sizes are the same on every rank in global/ema (the state is); in local
        # mode each rank saved its own (the sizes it had seen), so they are not compared there
        "loaded_dims": sorted(reg.recorder.loaded_dims.items()) if reg.mode.communicates else None,
    }
    dims = [reg.recorder.seen.get(i) for i in range(len(reg.layout.slots))]
    loaded = sorted(reg.recorder.loaded_dims.items())
    return Proposal(description, dims, str(dtype), shifts, dict(records.positions), loaded)


def agree(exchange: Exchange, mine: Proposal, communicate: bool, layout: Layout) -> Agreement:
    """Every rank's proposal, compared; raises the same error on every rank if they differ.

    The proposals are gathered whenever the group has more than one rank, in every mode; what
    is adopted from the other ranks (first shifts, rows) only when the step ``communicate``s.
    """
    everyone: list[Proposal] = exchange.gather_objects(mine)  # type: ignore[assignment]
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
    # a loaded state's sizes (compared above, so the same on every rank) for slots that did not
    # run in this step: their moving average is laid out now and decays like the saved run's
    # (a mismatch with what a rank records later is a RecordingError naming the loaded state)
    for index, d in mine.loaded_dims:
        dims.setdefault(index, d)
    dtype = torch.float32
    for p in everyone:
        dtype = torch.promote_types(dtype, getattr(torch, p.dtype.replace("torch.", "")))
    # first step of centred slots: the count-weighted mean of the ranks' own shifts
    per_slot: dict[int, list[tuple[float, list[float]]]] = {}
    for p in everyone if communicate else [mine]:
        for i, entry in p.shifts.items():
            per_slot.setdefault(i, []).append(entry)
    first: dict[int, Tensor] = {}
    for i, entries in per_slot.items():
        total = sum(n for n, _ in entries)
        if total > 0 and all(len(c) == dims.get(i) for _, c in entries):
            weighted = sum(n * torch.tensor(c, dtype=torch.float64) for n, c in entries) / total
            shift = weighted.to(dtype)  # type: ignore[union-attr]
            if bool(torch.isfinite(shift).all()):  # else the slot stays pending (see shifts)
                first[i] = shift
    return Agreement(dims, dtype, first, _rows(everyone, dims, layout) if communicate else {})


def _rows(everyone: list[Proposal], dims: dict[int, int], layout: Layout) -> dict[int, int]:
    """Slots whose ``d x d`` Gram is larger than the rows of all ranks: exchange rows instead.

    The capacity is the largest number of positions any rank recorded in this (first) step.
    """
    out = {}
    world = len(everyone)
    for index, slot in enumerate(layout.slots):
        d = dims.get(index)
        if d is None or "couter" not in slot.spec(d, layout.threshold).wanted:
            continue
        capacity = max(p.positions.get(index, 0) for p in everyone)
        if 0 < capacity and world * capacity * d < d * d:
            out[index] = capacity
    return out


def agree_shifts(
    exchange: Exchange,
    communicate: bool,
    pending: list[int],
    records: Records,
    shifts: Shifts,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[int, Tensor]:
    """The first shifts of ``pending`` centred slots (see :mod:`actreg.shifts`), after the first step.

    Per slot, every rank contributes ``[n_w c_w, n_w]`` in float64 -- its kept positions ``n_w``
    and the mean ``c_w`` of its own first rows it recorded around, zeros if it did not record the
    slot -- and one ``all_reduce(SUM)`` (when the step communicates) gives the count-weighted mean
    ``sum n_w c_w / sum n_w`` on every rank, as the first ``loss()`` computes it. A slot is agreed
    when that mean is defined (``sum n_w > 0``) and finite; it stays pending otherwise. Without
    communication the slot's own shift is adopted as it is, under the same conditions.

    Only called while pending slots exist; the list is identical on every rank of a communicating
    group by construction, so the collective always has a partner. The result is read on the host
    (the step waits for the device here, only in such steps).
    """
    own = shifts.local_shifts()
    dims = [shifts.layout.dims[i] for i in pending]
    pieces = []
    for i, d in zip(pending, dims, strict=True):
        block, c = records.blocks.get(i), own.get(i)
        if block is None or c is None or c.numel() != d:  # not recorded here (or unusable)
            pieces.append(torch.zeros(d + 1, dtype=torch.float64, device=device))  # type: ignore[operator]
            continue
        n = block.detach()[:1].to(device=device, dtype=torch.float64)
        pieces.append(torch.cat([c.detach().to(device=device, dtype=torch.float64) * n, n]))
    sums = torch.cat(pieces)
    if communicate:
        exchange.sum_(sums)
    host = sums.cpu()
    agreed: dict[int, Tensor] = {}
    at = 0
    for i, d in zip(pending, dims, strict=True):
        weighted, total = host[at : at + d], float(host[at + d])  # type: ignore[operator]
        at += d + 1  # type: ignore[operator]
        shift = (weighted / max(total, 1.0)).to(dtype)
        if total > 0 and bool(torch.isfinite(shift).all()):  # else: still pending
            # without communication, this rank's own shift as recorded (its blocks need no move)
            agreed[i] = shift if communicate else own[i]
    return agreed


_DTYPE_OF_BITS = {32: torch.float32, 64: torch.float64}


def _bits(records: Records) -> int:
    """Width of the widest statistics this rank recorded in this step (0: none recorded)."""
    return max((torch.finfo(b.dtype).bits for b in records.blocks.values()), default=0)


def resolve_dims(
    exchange: Exchange, layout: Layout, seen: dict[int, int], device: torch.device, bits: int = 0
) -> int:
    """Agree on the feature sizes of slots that had not run on any rank before this step, and on
    the widest statistics recorded in this step (``bits``; returned, 0 if none on any rank).

    Only called while such slots exist; the set is identical on all ranks by construction, so the
    small ``all_reduce(MAX)`` always has a partner (this step then has two collectives).
    """
    unresolved = [i for i, d in enumerate(layout.dims) if d is None]
    big = 2**40
    sizes = [seen.get(i) for i in unresolved]
    t = torch.tensor(
        [d or 0 for d in sizes] + [-(d or big) for d in sizes] + [bits], dtype=torch.int64, device=device
    )
    exchange.max_(t)
    k = len(unresolved)
    top, low, widest = t[:k].tolist(), (-t[k : 2 * k]).tolist(), int(t[2 * k])
    for i, hi, lo in zip(unresolved, top, low, strict=True):
        if hi == 0:
            continue
        if hi != lo:
            raise LayoutMismatchError(
                f"[actreg, {exchange.who}] {layout.slots[i].name!r} has different feature sizes "
                f"on different ranks (between {lo} and {hi})"
            )
        layout.set_dim(i, hi)
    return widest
