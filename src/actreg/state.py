"""Validation of a ``state_dict`` before anything of it is applied (all or nothing).

``ActivityRegularizer.state_dict()`` is::

    {"version": 1, "sync": str, "decay": float, "step": int,
     "ema":   {slot: {penalty label: {statistic: tensor of global sums}}},   # ema mode only
     "shift": {slot: [d] tensor},                                           # centred slots
     "dims":  {slot: feature size}}                                         # slots that ran

:func:`check_state_dict` checks every key, type, name, shape and value against the regularizer
that loads it and returns what to apply; any problem is a ``ValueError`` (``TypeError`` for a
value of the wrong type) that names the key, what it holds and what was expected. ``"dims"`` is
optional (states written before it existed): the feature sizes are then read off the tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .layout import Layout

Nested = dict[str, dict[str, dict[str, Tensor]]]

REQUIRED = ("version", "sync", "decay", "step", "ema", "shift")
OPTIONAL = ("dims", "expert_bias")  # expert_bias: validated by actreg.expert_bias


@dataclass(frozen=True)
class LoadedState:
    """A validated state, ready to apply."""

    step: int
    ema: Nested
    shift: dict[str, Tensor]
    dims: dict[int, int]  #: slot index -> feature size the state was saved with


def check_state_dict(
    layout: Layout, state: Any, *, sync: str, decay: float, moving_average: bool
) -> LoadedState:
    """Validate ``state`` for a regularizer of ``layout`` with ``sync`` / ``decay``; apply nothing."""
    if not isinstance(state, Mapping):
        raise TypeError(f"load_state_dict expects a mapping (from state_dict()), got {type(state).__name__}")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise ValueError(
            f"state_dict is missing key(s) {missing}; an actreg state_dict has {list(REQUIRED + OPTIONAL)}"
        )
    unexpected = sorted(str(k) for k in state if k not in REQUIRED + OPTIONAL)
    if unexpected:
        raise ValueError(
            f"state_dict has unexpected key(s) {unexpected}; expected {list(REQUIRED + OPTIONAL)}"
        )
    if state["version"] != 1:
        raise ValueError(f"state_dict['version'] is {state['version']!r}; this actreg reads version 1")
    if state["sync"] != sync:
        raise ValueError(
            f"state_dict['sync'] is {state['sync']!r} but this regularizer has sync={sync!r}; "
            "build it with the sync the state was saved with"
        )
    saved_decay = state["decay"]
    if isinstance(saved_decay, bool) or not isinstance(saved_decay, (int, float)):
        raise TypeError(f"state_dict['decay'] must be a number, got {saved_decay!r}")
    if moving_average and float(saved_decay) != decay:
        raise ValueError(
            f"state_dict['decay'] is {saved_decay!r} but this regularizer has decay={decay!r}; "
            "its moving average was built with another decay"
        )
    step = _step(state["step"])
    names = {s.name: i for i, s in enumerate(layout.slots)}
    dims = _dims(state.get("dims"), names, layout)
    ema = _mapping(state["ema"], "ema")
    if ema and not moving_average:
        raise ValueError(f"state_dict['ema'] holds statistics, but sync={sync!r} keeps no moving average")
    nested: Nested = {}
    for slot_name, per_label in ema.items():
        nested[slot_name] = _slot_ema(layout, names, dims, slot_name, per_label)
    if moving_average and step > 0 and "dims" in state:
        for index, d in dims.items():
            name = layout.slots[index].name
            if name not in nested:
                raise ValueError(
                    f"state_dict['ema'] has no statistics for {name!r}, which ran ({d} features) "
                    f"in the {step} step(s) the state covers"
                )
    shift: dict[str, Tensor] = {}
    for slot_name, t in _mapping(state["shift"], "shift").items():
        index = _slot_index(names, slot_name, "shift")
        if not layout.slots[index].centered:
            raise ValueError(
                f"state_dict['shift'] has a shift for {slot_name!r}, whose penalties take no "
                "centred statistics"
            )
        _tensor(t, f"state_dict['shift'][{slot_name!r}]")
        if t.dim() != 1:
            raise ValueError(
                f"state_dict['shift'][{slot_name!r}] must be a [d] vector, got shape {list(t.shape)}"
            )
        _same_dim(layout, dims, index, t.shape[0], f"state_dict['shift'][{slot_name!r}]")
        shift[slot_name] = t
    return LoadedState(step, nested, shift, dims)


def _step(value: Any) -> int:
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"state_dict['step'] must be an integer >= 0, got {value!r}")
    return value


def _mapping(value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"state_dict[{key!r}] must be a mapping, got {type(value).__name__}")
    return value


def _slot_index(names: dict[str, int], slot: str, key: str) -> int:
    if slot not in names:
        raise ValueError(
            f"state_dict[{key!r}] has {slot!r}, which this regularizer does not regularize "
            f"(its slots: {sorted(names)})"
        )
    return names[slot]


def _dims(value: Any, names: dict[str, int], layout: Layout) -> dict[int, int]:
    if value is None:
        return {}
    out: dict[int, int] = {}
    for slot, d in _mapping(value, "dims").items():
        index = _slot_index(names, slot, "dims")
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"state_dict['dims'][{slot!r}] must be a feature size >= 1, got {d!r}")
        _same_dim(layout, {}, index, d, f"state_dict['dims'][{slot!r}]")
        out[index] = d
    return out


def _same_dim(layout: Layout, dims: dict[int, int], index: int, d: int, what: str) -> None:
    """The feature size ``d`` read at ``what`` must match the layer's (known or saved) size."""
    name = layout.slots[index].name
    known = layout.dims[index]
    if known is not None and known != d:
        raise ValueError(f"{what} is for {d} features, but {name!r} has {known} features")
    saved = dims.setdefault(index, d)
    if saved != d:
        raise ValueError(f"{what} is for {d} features, but the state's other entries give {name!r} {saved}")


def _tensor(t: Any, what: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{what} must be a floating tensor, got {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} holds non-finite values: the state is damaged")
    return t


def _slot_ema(
    layout: Layout, names: dict[str, int], dims: dict[int, int], slot_name: str, per_label: Any
) -> dict[str, dict[str, Tensor]]:
    index = _slot_index(names, slot_name, "ema")
    slot = layout.slots[index]
    per_label = _mapping(per_label, f"ema'][{slot_name!r}")
    for label in per_label:
        if label not in slot.labels:
            raise ValueError(
                f"state_dict['ema'][{slot_name!r}] has statistics for {label!r}, which {slot_name!r} "
                f"does not have (its penalties: {list(slot.labels)})"
            )
    missing = [label for label in slot.labels if label not in per_label]
    if missing:
        raise ValueError(f"state_dict['ema'][{slot_name!r}] is missing the statistics of {missing}")
    out: dict[str, dict[str, Tensor]] = {}
    for label, penalty in zip(slot.labels, slot.penalties, strict=True):
        where = f"state_dict['ema'][{slot_name!r}][{label!r}]"
        stats = _mapping(per_label[label], f"ema'][{slot_name!r}][{label!r}")
        for stat, t in stats.items():
            _tensor(t, f"{where}[{stat!r}]")
        d = dims.get(index, layout.dims[index])
        if d is None:
            d = _infer_dim(penalty.statistic_shapes, stats)
        if d is None and any(t.dim() >= 1 for t in stats.values()):
            shapes = {k: list(t.shape) for k, t in stats.items()}
            raise ValueError(f"{where} has shapes {shapes}, which fit no feature size of {penalty!r}")
        if d is not None:
            expected = {k: tuple(v) for k, v in penalty.statistic_shapes(d).items()}
            got = {k: tuple(t.shape) for k, t in stats.items()}
            if set(got) != set(expected):
                raise ValueError(
                    f"{where} has statistics {sorted(got)}; {penalty!r} keeps {sorted(expected)}"
                )
            for k, shape in expected.items():
                if math.prod(got[k]) != math.prod(shape):
                    raise ValueError(
                        f"{where}[{k!r}] has shape {list(got[k])}, expected {list(shape)} for {d} features"
                    )
            _same_dim(layout, dims, index, d, where)
        out[label] = dict(stats)
    return out


def _infer_dim(shapes_for: Any, stats: Mapping[str, Tensor]) -> int | None:
    """The feature size whose statistic shapes the tensors have (None if they do not tell)."""
    candidates = {t.shape[-1] for t in stats.values() if t.dim() >= 1}
    for d in sorted(candidates):
        expected = {k: tuple(v) for k, v in shapes_for(d).items()}
        if all(tuple(t.shape) == expected.get(k) for k, t in stats.items()):
            return int(d)
    return None
