"""Worker functions for tests/test_first_steps.py: ``fn(rank, world_size, *args)`` on every rank.

Centred slots whose first step comes late (never ran, ran fully masked) or is not finite, and
non-finite activations under DDP. They return plain data (floats, numpy arrays, strings) that the
tests compare with single-process float64 references.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

import actreg
from problem import CASES, DECAY, EXPERTS, HIDDEN, IN_FEATURES, batch, shard_bounds

#: rows of the global batch of the large-mean problem, and each rank's share (uneven; W=3 has an
#: empty shard)
ROWS = 64
SHARES = {1: [64], 2: [40, 24], 3: [36, 0, 28]}
STD = 0.3


def shard(rank: int, world_size: int) -> slice:
    start = sum(SHARES[world_size][:rank])
    return slice(start, start + SHARES[world_size][rank])


def large_mean_batch(step: int, ratio: float, d: int = 4) -> Tensor:
    """float32 rows with ``|mean| / std = ratio`` (std 0.3, means ``ratio * 0.3 * (1 + j / 10)``),
    feature 1 correlated with feature 0; returned as float64 (every value exactly a float32)."""
    g = torch.Generator().manual_seed(70 + step)
    z = torch.randn(ROWS, d, generator=g, dtype=torch.float64)
    z[:, 1] += 0.5 * z[:, 0]
    means = ratio * STD * (1.0 + torch.arange(d, dtype=torch.float64) / 10)
    return (means + STD * z).float().double()


def light_batch(step: int) -> Tensor:
    """The L1 slot's rows (finite, small)."""
    g = torch.Generator().manual_seed(90 + step)
    return torch.randn(ROWS, 3, generator=g, dtype=torch.float64).float().double()


def moment_penalties() -> list[actreg.Penalty]:
    return [actreg.VarianceFloor(1.0), actreg.Covariance(1.0), actreg.DeCov(1.0)]


class Late(nn.Module):
    """``h`` runs only when asked: a module that runs conditionally."""

    def __init__(self) -> None:
        super().__init__()
        self.h = nn.Identity()

    def forward(self, x: Tensor, run: bool) -> Tensor:
        return self.h(x) if run else x


def _leaf(t: Tensor) -> Tensor:
    return t.float().requires_grad_(True)


def _grad(t: Tensor) -> np.ndarray:
    assert t.grad is not None
    return t.grad.double().numpy().copy()


def late_first_step(rank: int, world_size: int, sync: str, ratio: float, how: str) -> list[dict[str, Any]]:
    """Slot ``h`` (VarianceFloor, Covariance, DeCov) of float32 rows at ``|mean|/std = ratio`` has
    no first step at step 0 -- ``how``: ``"observed"`` (an observed name not fed), ``"module"`` (a
    module that did not run) or ``"masked"`` (fed with every position masked out on every rank);
    slot ``a`` (L1) runs every step. Steps 1 and 2 feed both. Per step: metrics, and the
    gradients of ``h``'s and ``a``'s rows (as each rank's own, times the surrogate's ``g``)."""
    model = Late()
    reg = actreg.ActivityRegularizer(
        model,
        {"h": moment_penalties(), "a": actreg.L1(0.7)},
        observed=["a"] if how == "module" else ["a", "h"],
        sync=sync,
        decay=DECAY,
    )
    rows = shard(rank, world_size)
    out = []
    for step in range(3):
        xa = _leaf(light_batch(step)[rows])
        xh = _leaf(large_mean_batch(step, ratio)[rows])
        reg.observe("a", xa)
        if step > 0 or how == "masked":
            mask = None if step > 0 else torch.zeros(xh.shape[0], dtype=torch.bool)
            if how == "module":
                model(xh, run=True)
            else:
                reg.observe("h", xh, mask)
        else:
            model(xh, run=False)
        loss = reg.loss()
        loss.backward()
        result = {"metrics": reg.metrics(), "a": _grad(xa)}
        result["h"] = _grad(xh) if xh.grad is not None else np.zeros(tuple(xh.shape))
        out.append(result)
    return out


def nonfinite_first_step(
    rank: int, world_size: int, sync: str, policy: str, bad: float, ratio: float
) -> list[dict[str, Any]]:
    """Slot ``h`` (VarianceFloor, Covariance, DeCov; float32 rows at ``|mean|/std = ratio``) gets
    ``bad`` (inf or NaN) in one value of rank 0's rows at step 0, its first step; slot ``a`` (L1)
    is finite throughout. Steps 1 and 2 are finite. Per step: what ``check()`` raised (or None),
    metrics, and the gradients of both slots' rows."""
    reg = actreg.ActivityRegularizer(
        nn.Identity(),
        {"h": moment_penalties(), "a": actreg.L1(0.7)},
        observed=["a", "h"],
        sync=sync,
        decay=DECAY,
        nonfinite=policy,
    )
    rows = shard(rank, world_size)
    out = []
    for step in range(3):
        xa = _leaf(light_batch(step)[rows])
        h = large_mean_batch(step, ratio)[rows].clone()
        if step == 0 and rank == 0:
            h[3, 1] = bad
        xh = _leaf(h)
        reg.observe("a", xa)
        reg.observe("h", xh)
        reg.loss().backward()
        raised = None
        try:
            reg.check()
        except actreg.NonFiniteStatisticError as err:
            raised = str(err)
        out.append({"raised": raised, "metrics": reg.metrics(), "a": _grad(xa), "h": _grad(xh)})
    return out


class Inject(nn.Module):
    """Adds ``bad`` (a buffer: 0, or inf/NaN on one feature) to its input: a non-finite activation
    whose own backward is clean (the identity), so that only actreg's gradient can carry NaN."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.bad = torch.zeros(d, dtype=torch.float64)  # not a buffer: DDP would broadcast rank 0's

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bad


def make_injected(name: str, width: int = HIDDEN) -> nn.Sequential:
    """``Linear(5, d)`` then :class:`Inject` (module ``"1"``, the regularized one), float64, seed 0;
    ``d`` is the number of experts for router penalties, else ``width``."""
    d = EXPERTS if CASES[name][1] == "2" else width
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN_FEATURES, d), Inject(d)).double()


def nonfinite_activation(
    rank: int, world_size: int, names: list[str], sync: str, bad: float, width: int = HIDDEN
) -> dict[str, Any]:
    """Per penalty: DDP, the penalty on module ``"1"`` (``width`` features) as the only loss.
    Step 0: rank 0's activation is ``bad`` (inf or NaN) on feature 0; step 1: finite (same
    parameters). Returns the averaged gradients of both steps and each step's loss."""
    start, stop = shard_bounds(rank, world_size)
    out: dict[str, Any] = {}
    for name in names:
        model = make_injected(name, width)
        net = DDP(model)
        penalty = eval(CASES[name][0], {k: getattr(actreg, k) for k in actreg.__all__})
        reg = actreg.ActivityRegularizer(net, {"1": penalty}, sync=sync, decay=DECAY, nonfinite="skip")
        steps = []
        for step in range(2):
            x, mask = batch(step)
            model[1].bad.zero_()
            if step == 0 and rank == 0:
                model[1].bad[0] = bad
            net.zero_grad()
            with reg.mask(mask[start:stop]):
                net(x[start:stop])
            loss = reg.loss()
            loss.backward()
            steps.append({"loss": loss.item(), "grads": [p.grad.numpy().copy() for p in model.parameters()]})
        out[name] = steps
    return out
