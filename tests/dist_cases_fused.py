"""Worker functions for tests/test_fused.py: DDP training through actreg's fused kernels."""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import actreg
from dist_cases import make_penalty
from problem import CASES, LR, STEPS, batch, make_model, shard_bounds


def train(rank: int, world_size: int, names: list[str], masked: bool, fused: bool) -> dict[str, Any]:
    """Per penalty: ``STEPS`` SGD steps of the problem model under DDP, the penalty as the only
    loss, statistics through the fused kernels (``fused``) or the eager code; the averaged
    gradients and losses per step, and how many fused kernels this process compiled."""
    start, stop = shard_bounds(rank, world_size)
    out: dict[str, Any] = {}
    for name in names:
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        net = DDP(model)
        reg = actreg.ActivityRegularizer(net, {CASES[name][1]: make_penalty(name)}, fused=fused)
        grads, losses = [], []
        for step in range(STEPS):
            x, mask = batch(step)
            opt.zero_grad()
            if masked:
                with reg.mask(mask[start:stop]):
                    y = net(x[start:stop])
            else:
                y = net(x[start:stop])
            loss = reg.loss()
            (loss + 0.0 * y.sum()).backward()
            grads.append([p.grad.detach().numpy().copy() for p in model.parameters()])
            losses.append(loss.item())
            opt.step()
        out[name] = {"grads": grads, "loss": losses}
        reg.remove()
    out["kernels"] = sum(1 for k in actreg.fused._kernels.values() if k is not None)
    return out


def fsdp2(rank: int, world_size: int, names: list[str]) -> dict[str, Any] | str:
    """dist_cases.fsdp2 (FSDP2 ``fully_shard``, the penalty as the only loss) with fused kernels on."""
    import os

    import dist_cases

    previous = os.environ.get(actreg.fused.ENV)
    os.environ[actreg.fused.ENV] = "1"
    try:
        return dist_cases.fsdp2(rank, world_size, names)
    finally:
        if previous is None:
            del os.environ[actreg.fused.ENV]
        else:
            os.environ[actreg.fused.ENV] = previous
