"""Worker functions for the weight-penalty tests (DDP and FSDP2 ``fully_shard``), run by the pool."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.profiler import ProfilerActivity, profile

import actreg
from problem import batch, shard_bounds

LR = 0.2
STEPS = 2


def make_model() -> nn.Sequential:
    """Linear(5, 7) -> Sigmoid -> Linear(7, 3): dimension 0 of 7 and 3 shards unevenly on 2 and 3 ranks."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 7), nn.Sigmoid(), nn.Linear(7, 3)).double()


def regularizer(model: nn.Module, sync: str = "global") -> actreg.ActivityRegularizer:
    return actreg.ActivityRegularizer(
        model,
        {"1": actreg.L1(0.7)},
        weights={"*.weight": actreg.WeightL2(0.3), "2.*": [actreg.WeightL1(0.2), actreg.WeightL2(0.1)]},
        sync=sync,
    )


def _full(t: torch.Tensor) -> np.ndarray:
    full = getattr(t, "full_tensor", None)
    return (full() if full is not None else t).detach().numpy().copy()


def train(rank: int, world_size: int, wrap: str, built: str) -> dict[str, Any]:
    """Two SGD steps of L1 on layer "1" plus weight penalties; ``wrap`` "ddp" or "fsdp"; the
    regularizer ``built`` "before" or "after" wrapping."""
    start, stop = shard_bounds(rank, world_size)
    model = make_model()
    reg = regularizer(model) if built == "before" else None
    if wrap == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model[0])
        fully_shard(model[2])
        fully_shard(model)
        net: nn.Module = model
    else:
        net = DDP(model)
    if reg is None:
        reg = regularizer(net)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses, grads, metrics, collectives = [], [], [], []
    for step in range(STEPS):
        x, mask = batch(step)
        opt.zero_grad()
        with reg.mask(mask[start:stop]):
            y = net(x[start:stop])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            loss = reg.loss()
        collectives.append([e.name for e in prof.events() if e.name.startswith("c10d::")])
        (loss + 0.0 * y.sum()).backward()
        grads.append([_full(p.grad) for p in model.parameters()])
        losses.append(loss.item())
        metrics.append(reg.metrics())
        opt.step()
    return {
        "loss": losses,
        "grads": grads,
        "metrics": metrics,
        "params": [_full(p) for p in model.parameters()],
        "collectives": collectives,
        "sharded": [type(p).__name__ for p in model.parameters()],
    }


def local_mode_with_shards(rank: int, world_size: int) -> str:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    fully_shard(model[0])  # resharded after its forward: DTensors when loss() runs
    fully_shard(model)
    reg = regularizer(model, sync="local")
    x, _ = batch(0)
    model(x)
    try:
        reg.loss()
    except ValueError as err:
        return str(err)
    return "no error"

