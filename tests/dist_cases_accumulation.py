"""Worker function for the gradient-accumulation tests (DDP ``no_sync``), run by the pool."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import actreg
from dist_cases import make_penalty
from problem import CASES, batch, make_model, shard_bounds

LR = 0.2


def accumulate(rank: int, world_size: int, recipe: str, sync: str, k: int, steps: int) -> dict[str, Any]:
    """DDP with ``no_sync()`` over ``k`` micro-batches per optimizer step (see docs/accumulation.md).

    ``recipe="micro"``: ``(reg.loss()) / k`` in every micro-batch, no mask (equal counts);
    ``recipe="window"``: ``reg.loss()`` once, in the last micro-batch, over the records of all of
    them (earlier backwards keep their graphs), with padding masks.
    """
    start, stop = shard_bounds(rank, world_size)
    model = make_model()
    net = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    names = ["L1", "VarianceFloor"]
    reg = actreg.ActivityRegularizer(
        net, {CASES["L1"][1]: [make_penalty(n) for n in names]}, sync=sync, decay=0.6
    )
    losses, collectives = [], 0
    for step in range(steps):
        opt.zero_grad()
        for i in range(k):
            x, mask = batch(step * k + i)
            keep = mask[start:stop] if recipe == "window" else None
            last = i == k - 1
            with net.no_sync() if not last else nullcontext():
                with reg.mask(keep):
                    y = net(x[start:stop])
                loss = 0.0 * y.sum()
                if recipe == "micro":
                    penalty = reg.loss() / k
                    loss = loss + penalty
                    losses.append(penalty.item())
                    collectives += 1
                elif last:
                    penalty = reg.loss()
                    loss = loss + penalty
                    losses.append(penalty.item())
                    collectives += 1
                loss.backward(retain_graph=recipe == "window" and not last)
        opt.step()
    params = [p.detach().numpy().copy() for p in model.parameters()]
    return {"loss": losses, "params": params, "collectives": collectives}
