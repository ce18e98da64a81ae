"""Figures read from a step's reduced buffer: activity metrics and error details (host side).

Activity statistics are sums over kept positions, never differentiated: ``count`` (positions),
``abs_sum`` and ``sq_sum`` over all elements, and per unit ``active`` -- the number of positions
where ``|x| > threshold``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import Layout


def activity_figures(layout: Layout, index: int, wire: Tensor) -> dict[str, float]:
    """``count``, ``mean_abs``, ``rms``, ``active_fraction`` (of elements) and ``dead_units`` (units
    never active on any kept position; 0 when nothing was recorded) of slot ``index``."""
    where = layout.activity(index)
    head = wire[where["count"].offset : where["count"].offset + 3].double().tolist()
    n, abs_sum, sq_sum = head
    active = wire[where["active"].offset : where["active"].offset + where["active"].numel]
    d = active.numel()
    elements = n * d if n * d > 0 else 1.0
    return {
        "count": n,
        "mean_abs": abs_sum / elements,
        "rms": (sq_sum / elements) ** 0.5 if sq_sum >= 0 else float("nan"),
        "active_fraction": float(active.double().sum()) / elements,
        "dead_units": float((active == 0).sum()) if n > 0 else 0.0,
    }


def nonfinite_message(layout: Layout, order: list[tuple[int, str]], values: Tensor, wire: Tensor) -> str:
    """Which slots had non-finite global statistics, and which penalty values were not finite."""
    bad = []
    for index, slot in enumerate(layout.slots):
        size = layout.block_sizes[index]
        if size and not bool(
            torch.isfinite(wire[layout.offsets[index] : layout.offsets[index] + size]).all()
        ):
            bad.append(slot.name)
    names = [f"{layout.slots[i].name}/{label}" for i, label in order]
    bad_values = [names[i] for i, v in enumerate(values.tolist()) if v != v or abs(v) == float("inf")]
    return f"non-finite global statistics for {bad} / penalty values {bad_values}"


def step_metrics(
    layout: Layout,
    order: list[tuple[int, str]],
    values: Tensor,
    wire: Tensor,
    ok: bool,
    skipped: float | None,
) -> dict[str, float]:
    """``ActivityRegularizer.metrics()`` of a step: penalty values (0 for a skipped step), each
    slot's activity figures, ``total`` and (``skipped`` given) ``skipped_steps``."""
    by_label = dict(zip(order, values.tolist(), strict=True)) if ok else {}
    out: dict[str, float] = {}
    for index, slot in enumerate(layout.slots):
        for label in slot.labels:
            out[f"{slot.name}/{label}"] = by_label.get((index, label), 0.0)
        if layout.dims[index] is not None:
            for key, v in activity_figures(layout, index, wire).items():
                out[f"{slot.name}/{key}"] = v
    out["total"] = float(values.sum()) if ok else 0.0
    if skipped is not None:
        out["skipped_steps"] = skipped
    return out
