"""Worker functions for tests/test_window_balance.py: ``LoadBalance(counts="window")`` under
gradient accumulation (issue 13 item 4), DDP with ``no_sync()``.

The problem: a float64 router (``Linear(5, 4)``) wrapped in DDP, ``MICROS[step]`` micro-batches
(2 or 3) per optimizer step of ``TOKENS`` global tokens with a padding mask, split over the W ranks
unevenly (``SHARDS``: at W = 3 some ranks hold nothing in some micro-batches). SGD moves the router
between optimizer steps. Nothing here computes a reference: tests/test_window_balance.py does, on
the global tokens, in float64.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.profiler import ProfilerActivity, profile
from torch.utils.checkpoint import checkpoint

import actreg

TOKENS = 12
IN_FEATURES = 5
EXPERTS = 4
MICROS = [3, 2, 3]  #: micro-batches of each optimizer step
LR = 0.5
#: tokens of each rank in the i-th micro-batch of a step (contiguous), by world size
SHARDS = {
    1: [[12], [12], [12]],
    2: [[7, 5], [3, 9], [12, 0]],
    3: [[5, 0, 7], [0, 12, 0], [4, 1, 7]],
}

#: name -> (router penalty, recipe, trigger, checkpointed). Recipes: "micro" (``reg.loss()`` in
#: every micro-batch, no graph kept) and "kept" (``reg.loss()`` once, in the last micro-batch, the
#: earlier graphs kept). Triggers close the window: "update_bias", "attach", or None.
CASES: dict[str, tuple[str, str, str | None, bool]] = {
    "window_softmax": ("LoadBalance(4, 2, 0.5, counts='window')", "micro", "update_bias", False),
    "window_sigmoid_checkpointed": (
        "LoadBalance(4, 2, 0.5, score='sigmoid', counts='window')",
        "micro",
        "attach",
        True,
    ),
    "window_top1_checkpointed": ("LoadBalance(4, 1, 0.5, counts='window')", "micro", "update_bias", True),
    "batch_per_micro": ("LoadBalance(4, 2, 0.5)", "micro", None, False),
    "batch_per_micro_checkpointed": ("LoadBalance(4, 2, 0.5)", "micro", None, True),
    "batch_kept_graphs": ("LoadBalance(4, 2, 0.5)", "kept", None, False),
}


def make_penalty(name: str) -> actreg.LoadBalance:
    return eval(CASES[name][0], {"LoadBalance": actreg.LoadBalance})  # type: ignore[no-any-return]


class Net(nn.Module):
    """The router, its logits observed as ``"router"`` (inside the checkpoint when checkpointed)."""

    def __init__(self, checkpointed: bool) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.router = nn.Linear(IN_FEATURES, EXPERTS).double()
        self.checkpointed = checkpointed
        self.reg: actreg.ActivityRegularizer | None = None

    def _route(self, x: Tensor, mask: Tensor) -> Tensor:
        logits = self.router(x)
        assert self.reg is not None
        self.reg.observe("router", logits, mask)
        return logits

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        if self.checkpointed:  # recomputed in backward: its tokens must not be counted twice
            out: Tensor = checkpoint(self._route, x, mask, use_reentrant=False)
            return out
        return self._route(x, mask)


def micro_batch(seed: int, step: int, micro: int) -> tuple[Tensor, Tensor]:
    """Global tokens ``[TOKENS, 5]`` and mask ``[TOKENS]`` of micro-batch ``micro`` of ``step``,
    drawn from ``seed`` (each test module its own)."""
    g = torch.Generator().manual_seed(seed + 10 * step + micro)
    x = torch.randn(TOKENS, IN_FEATURES, generator=g, dtype=torch.float64) * 2.0
    mask = torch.rand(TOKENS, generator=g) > 0.25
    return x, mask


def shard_bounds(
    shards: dict[int, list[list[int]]], rank: int, world_size: int, micro: int
) -> tuple[int, int]:
    """``[start, stop)`` of ``rank``'s tokens in micro-batch ``micro`` (``shards``: sizes by world size)."""
    sizes = shards[world_size][micro]
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def batch(step: int, micro: int) -> tuple[Tensor, Tensor]:
    return micro_batch(1300, step, micro)


def bounds(rank: int, world_size: int, micro: int) -> tuple[int, int]:
    return shard_bounds(SHARDS, rank, world_size, micro)


def train(rank: int, world_size: int, names: list[str], sync: str = "global") -> dict[str, Any]:
    """Per case: the penalty of every ``loss()``, the router's accumulated (DDP-averaged) gradient
    at every optimizer step, the collectives of each ``loss()`` and of each step, the metric."""
    out: dict[str, Any] = {}
    for name in names:
        _, recipe, trigger, checkpointed = CASES[name]
        net = Net(checkpointed)
        ddp = DDP(net)
        opt = torch.optim.SGD(net.parameters(), lr=LR)
        reg = actreg.ActivityRegularizer(
            ddp, {"router": [make_penalty(name)]}, observed=["router"], sync=sync
        )
        net.reg = reg
        if trigger == "attach":
            reg.attach(opt)
        losses, grads, metrics, collectives = [], [], [], []
        for step, k in enumerate(MICROS):
            opt.zero_grad()
            for micro in range(k):
                x, mask = batch(step, micro)
                start, stop = bounds(rank, world_size, micro)
                last = micro == k - 1
                with ddp.no_sync() if not last else nullcontext():
                    logits = ddp(x[start:stop], mask[start:stop])
                    loss = 0.0 * logits.sum()
                    if recipe == "micro" or last:
                        with profile(activities=[ProfilerActivity.CPU]) as prof:
                            penalty = reg.loss()
                        collectives.append([e.name for e in prof.events() if e.name.startswith("c10d::")])
                        losses.append(penalty.item())
                        metrics.append(reg.metrics()["router/LoadBalance"])
                        loss = loss + penalty
                    loss.backward(retain_graph=recipe == "kept" and not last)
            grads.append([p.grad.detach().numpy().copy() for p in (net.router.weight, net.router.bias)])  # type: ignore[union-attr]
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                opt.step()
                if trigger == "update_bias":
                    reg.update_bias()
            collectives.append([e.name for e in prof.events() if e.name.startswith("c10d::")])
        out[name] = {"loss": losses, "grad": grads, "metric": metrics, "collectives": collectives}
        reg.check()
        reg.remove()
    return out
