"""Pool tasks for defects the differential soak (tests/soak.py) found: ``fn(rank, world_size, *args)``."""

from __future__ import annotations

import torch

import actreg

ROWS = [3, 5, 0]  #: rows per rank (uneven; rank 2's shard is empty)


def late_batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(sum(ROWS), 4, generator=g, dtype=torch.float64) * 3.0 + 1.0


def late_float64(rank: int, world_size: int, sync: str) -> list[float]:
    """A float64 activation first recorded in step 1 (step 0's loss() saw nothing on any rank)."""
    start = sum(ROWS[:rank])
    stop = start + ROWS[rank] if rank < world_size - 1 else sum(ROWS)
    model = torch.nn.Linear(4, 4).double()
    reg = actreg.ActivityRegularizer(
        model, {"h": [actreg.L2(0.7), actreg.VarianceFloor(1.3, gamma=5.0)]}, observed=["h"], sync=sync
    )
    out: list[float] = []
    for step in range(3):
        if step > 0:
            reg.observe("h", late_batch(step)[start:stop])
        out.append(float(reg.loss().detach()))
        reg.check()
    return out


def late_float64_reference(step: int) -> float:
    """``0.7 Σx²/n + 1.3 mean_j relu(5 - std_j)`` (unbiased std) of the whole batch, float64."""
    x = late_batch(step)
    n = x.shape[0]
    std = (x.var(0, unbiased=True) + 1e-4).sqrt()
    return float(0.7 * x.square().sum() / n + 1.3 * torch.relu(5.0 - std).mean())



def local_resume(rank: int, world_size: int) -> dict[str, list[float]]:
    """``sync="local"``: slot ``side`` first runs after the first step, on rank 0 only, before a
    checkpoint, so each rank's ``state_dict()["dims"]`` differs; every rank reloads its own state
    into a fresh regularizer and continues. Returns the losses of the uninterrupted run and of the
    resumed one."""

    def make() -> actreg.ActivityRegularizer:
        return actreg.ActivityRegularizer(
            torch.nn.Identity(),
            {"side": [actreg.L2(0.5), actreg.VarianceFloor(1.0, gamma=5.0)]},
            observed=["side"],
            sync="local",
        )

    def step(reg: actreg.ActivityRegularizer, i: int) -> float:
        if i >= 2 or (i == 1 and rank == 0):
            reg.observe("side", late_batch(i)[3 * rank : 3 * rank + 3])
        value = float(reg.loss().detach())
        reg.check()
        return value

    reg = make()
    whole = [step(reg, i) for i in range(4)]
    first = make()
    resumed = [step(first, i) for i in (0, 1)]
    second = make()
    second.load_state_dict(first.state_dict())
    resumed += [step(second, i) for i in (2, 3)]
    return {"whole": whole, "resumed": resumed}
