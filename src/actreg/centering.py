"""Accumulating second moments around a shift, so that ``E[x^2] - E[x]^2`` does not cancel.

Shift-invariant penalties (variances, covariances) declare in ``Penalty.centered`` which of their
statistics are first moments (``"first"``: ``sum_i x_i``), per-unit second moments (``"square"``:
``sum_i x_i^2``) or Gram matrices (``"outer"``: ``sum_i x_i x_i^T``). The regularizer then feeds
them ``x - c`` instead of ``x``, where the shift ``c`` of a layer is the global mean of its previous
step (identical on every rank, so shard sums still add up). The values are unchanged, but float32
sums keep their precision when ``|mean| >> std``. A moving average accumulated around an old shift
is moved to the new one exactly (with ``delta = c_new - c_old``):

    sum' = sum - n delta
    sq'  = sq - 2 delta * sum + n delta^2
    G'   = G - delta sum^T - sum delta^T + n delta delta^T
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .layout import Layout
    from .statistics import BlockSpec

KINDS = ("first", "square", "outer")


def check_centered(name: str, centered: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Validate a penalty's ``centered`` declaration against its statistic shapes."""
    if not centered:
        return
    bad = {k: v for k, v in centered.items() if v not in KINDS or k not in shapes}
    firsts = [k for k, v in centered.items() if v == "first"]
    if bad or len(firsts) != 1 or "count" not in shapes:
        raise ValueError(
            f"{name}.centered must map statistic names to one of {KINDS}, with exactly one 'first' "
            f"statistic and a 'count' statistic; got {dict(centered)}"
        )


def recenter(stats: Mapping[str, Tensor], centered: Mapping[str, str], delta: Tensor) -> dict[str, Tensor]:
    """The statistics ``stats`` (taken around ``c``) taken around ``c + delta`` instead."""
    out = dict(stats)
    n = stats["count"]
    first = next(k for k, v in centered.items() if v == "first")
    s1 = stats[first]
    for key, kind in centered.items():
        if kind == "first":
            out[key] = s1 - n * delta
        elif kind == "square":
            out[key] = stats[key] - 2 * delta * s1 + n * delta * delta
        else:
            cross = torch.outer(delta, s1)
            out[key] = stats[key] - cross - cross.T + n * torch.outer(delta, delta)
    return out


def recenter_block(
    block: Tensor, layout: Layout, index: int, delta: Tensor, spec: BlockSpec | None = None
) -> Tensor:
    """Slot ``index``'s block (statistics around ``c``) taken around ``c + delta`` instead.

    Moves the fused centred primitives and the centred statistics of penalties that record their
    own; everything else is unchanged. Differentiable (a linear map of ``block``). ``spec`` is the
    form of ``block``: the layout's (the reduced statistics, a moving average) unless given -- a
    recorded block passes its record spec. A ``"rows"`` or ``"kernel"`` area is not moved here: a
    kernel of gathered rows cannot be, and recorded rows are moved before, with their markers
    (:func:`actreg.exchange.prepare_rows`).
    """
    reduced = layout.specs[index]
    assert reduced is not None
    spec = reduced if spec is None else spec
    base = layout.offsets[index]
    own_at = spec.size - reduced.size  # own statistics follow the fused ones: shift their places

    def view(start: int, shape: tuple[int, ...]) -> Tensor:
        return block.narrow(0, start, math.prod(shape)).view(shape)

    moved: dict[int, Tensor] = {}  # start in the block -> moved statistic
    fused = {"csum": "first", "csq": "square", "couter": "outer"}
    kinds = {
        name: kind
        for name, kind in fused.items()
        if name in spec.offsets and (name != "couter" or spec.form == "gram")
    }
    if kinds:
        stats = {name: view(spec.offsets[name], spec.shape(name)) for name in (*kinds, "count")}
        out = recenter(stats, kinds, delta)
        moved.update({spec.offsets[name]: out[name] for name in kinds})
    for label, p in layout.slots[index].own:
        if p.centered:
            places = {k: (w.offset - base + own_at, w.shape) for k, w in layout.where(index, label).items()}
            out = recenter({k: view(*place) for k, place in places.items()}, p.centered, delta)
            moved.update({places[k][0]: out[k] for k in p.centered})
    if not moved:
        return block
    pieces, at = [], 0
    for start in sorted(moved):
        t = moved[start].reshape(-1)
        if start > at:
            pieces.append(block.narrow(0, at, start - at))
        pieces.append(t)
        at = start + t.numel()
    if at < block.numel():
        pieces.append(block.narrow(0, at, block.numel() - at))
    return torch.cat(pieces)
