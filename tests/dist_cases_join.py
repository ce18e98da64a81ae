"""Worker functions for the ``Join`` tests (tests/test_join.py), run by the pool on every rank.

One task runs several cases in a row (a DDP model, regularizers and a ``Join`` built per case, so a
regularizer built per epoch and its private group are exercised too) and returns plain data.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel as DDP

import actreg
from dist_cases import make_penalty
from problem import DECAY, EXPERTS, LR, batch, make_model, shard_bounds

#: weight penalty of the cases with ``weights=`` (on the two Linear layers' weights)
WEIGHT_L2 = 0.05


class Net(nn.Module):
    """The problem model as ``body`` (regularized slot ``body.1``), with a buffer if asked.

    ``buffers``: ``None``; ``"bn"`` -- a ``BatchNorm1d`` on the output (running statistics and a
    batch counter); ``"const"`` -- one constant buffer multiplying the output. Either way DDP's
    default ``broadcast_buffers=True`` broadcasts them at every forward. The output enters the
    loss as ``0 * y.sum()`` only, so the buffers change nothing in the reference.
    """

    def __init__(self, buffers: str | None) -> None:
        super().__init__()
        self.body = make_model()
        self.buffers_kind = buffers
        if buffers == "bn":
            self.norm = nn.BatchNorm1d(EXPERTS).double()
        elif buffers == "const":
            self.register_buffer("scale", torch.full((), 2.0, dtype=torch.float64))
        elif buffers is not None:
            raise ValueError(f"buffers must be None, 'bn' or 'const', got {buffers!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if self.buffers_kind == "bn":
            return self.norm(y.flatten(0, 1))
        if self.buffers_kind == "const":
            return y * self.scale
        return y


def _regularizer(
    net: nn.Module, names: list[str], sync: str, weights: bool, fused: bool = False
) -> actreg.ActivityRegularizer:
    return actreg.ActivityRegularizer(
        net,
        {"body.1": [make_penalty(n) for n in names]},
        sync=sync,
        decay=DECAY,
        weights={"body.*.weight": actreg.WeightL2(WEIGHT_L2)} if weights else None,
        fused=fused,
    )


def _flat_state(reg: actreg.ActivityRegularizer) -> tuple[int, dict[str, np.ndarray]]:
    state = reg.state_dict()
    ema = {
        f"{slot}/{label}/{stat}": t.numpy().copy()
        for slot, per_label in state["ema"].items()
        for label, stats in per_label.items()
        for stat, t in stats.items()
    }
    return state["step"], ema


def join_cases(rank: int, world_size: int, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each case: rank r trains ``case["batches"][r]`` steps of SGD inside ``Join([ddp, *regs])``.

    Case keys: ``batches``; ``regs`` -- a list of ``(names, sync)``, one regularizer each, listed
    in that order in the ``Join``; ``order`` -- the order their ``loss()`` is called in (indices
    into ``regs``; default as listed); ``weights`` -- the first regularizer also carries
    ``WeightL2`` on ``body.*.weight``; ``buffers`` (see :class:`Net`); ``accumulate`` -- micro-
    batches per optimizer step, all but the last under ``no_sync`` (default 1); ``fused`` -- the
    regularizers' fused kernels (default off).

    Returns per case: per step the summed ``loss()`` values and the first regularizer's
    ``metrics()``; the final ``body`` parameters; each regularizer's step count and EMA state
    after the ``Join``, its ``metrics()`` there, and the value of one more step taken by every
    rank after the ``Join`` (batch 0) -- which must still pair up; and the actreg warnings raised.
    """
    start, stop = shard_bounds(rank, world_size)
    out = []
    for case in cases:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            result = _join_case(rank, case, start, stop)
        result["warnings"] = [str(w.message) for w in seen if "actreg" in str(w.message)]
        out.append(result)
    return out


def _join_case(rank: int, case: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    """One case of :func:`join_cases` on this rank (its shard ``start:stop``)."""
    net_module = Net(case.get("buffers"))
    net = DDP(net_module)
    opt = torch.optim.SGD(net_module.body.parameters(), lr=LR)
    regs = [
        _regularizer(net, names, sync, case.get("weights", False) and i == 0, case.get("fused", False))
        for i, (names, sync) in enumerate(case["regs"])
    ]
    order = case.get("order", list(range(len(regs))))
    accumulate = case.get("accumulate", 1)
    losses: list[float] = []
    metrics: list[dict[str, float]] = []
    with Join([net, *regs]):
        for step in range(case["batches"][rank]):
            x, mask = batch(step)
            last_micro = (step + 1) % accumulate == 0
            with net.no_sync() if not last_micro else contextlib.nullcontext():
                y = _forward(net, regs, x[start:stop], mask[start:stop])
                total = sum(regs[i].loss() for i in order)
                (total + 0.0 * y.sum()).backward()  # every parameter takes part
            losses.append(float(total.detach()))
            metrics.append(regs[0].metrics())
            if last_micro:
                opt.step()
                opt.zero_grad()
    after_metrics = [reg.metrics() for reg in regs]
    states = [_flat_state(reg) for reg in regs]
    x, mask = batch(0)
    _forward(net, regs, x[start:stop], mask[start:stop])
    after = sum(float(regs[i].loss().detach()) for i in order)
    result = {
        "loss": losses,
        "metrics": metrics,
        "params": [p.detach().numpy().copy() for p in net_module.body.parameters()],
        "steps": [s for s, _ in states],
        "ema": [e for _, e in states],
        "after_metrics": after_metrics,
        "after": after,
    }
    for reg in regs:
        reg.remove()
    return result



def _forward(
    net: nn.Module, regs: list[actreg.ActivityRegularizer], x: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``net(x)`` with ``mask`` set on every regularizer's recordings."""
    with contextlib.ExitStack() as stack:
        for reg in regs:
            stack.enter_context(reg.mask(mask))
        return net(x)


def refused_order(rank: int, world_size: int, divide_by_initial_world_size: bool = True) -> dict[str, Any]:
    """``Join([reg, ddp_model])`` (or, with ``divide_by_initial_world_size=False``, ``Join([ddp_model,
    reg], divide_by_initial_world_size=False)``): the error raised on this rank (``None`` if none)."""
    net = DDP(Net(None))
    reg = _regularizer(net, ["L1"], "global", False)
    try:
        if divide_by_initial_world_size:
            Join([reg, net])
        else:
            Join([net, reg], divide_by_initial_world_size=False)
    except ValueError as err:
        return {"refused": str(err)}
    finally:
        reg.remove()
    return {"refused": None}


def error_after_join(rank: int, world_size: int, batches: list[int], bad_step: int) -> dict[str, Any]:
    """Rank r trains ``batches[r]`` steps in ``Join``; at ``bad_step`` the ranks still training feed
    NaN (``nonfinite="raise"``): the next ``loss()`` raises. Returns the error this rank raised."""
    start, stop = shard_bounds(rank, world_size)
    net = DDP(Net(None))
    reg = _regularizer(net, ["L1"], "global", False)
    try:
        with Join([net, reg]):
            for step in range(batches[rank]):
                x, mask = batch(step)
                if step == bad_step:
                    x = x * float("nan")
                y = _forward(net, [reg], x[start:stop], mask[start:stop])
                (reg.loss() + 0.0 * y.sum()).backward()
    except Exception as err:  # reported to the test
        return {"error": type(err).__name__, "message": str(err)}
    finally:
        reg.remove()
    return {"error": None, "message": ""}
