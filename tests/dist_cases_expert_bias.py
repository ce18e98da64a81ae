"""Worker functions for tests/test_expert_bias.py: aux-loss-free balancing (``ExpertBias``, issue 13
item 3).

The problem: a fixed float64 router (``Linear(5, 4)``) on ``MICRO`` micro-batches per optimizer step
of ``TOKENS`` tokens with a padding mask; the global tokens of each micro-batch are split over the W
ranks unevenly (``SHARDS``: at W = 3 a rank holds nothing in one micro-batch, two ranks nothing in
the other). Every micro-batch calls ``reg.loss()`` (the per-micro-batch recipe), so the window of an
optimizer step has two collectives whose counts must add up. Nothing here computes a reference:
tests/test_expert_bias.py does, on the global tokens, in float64.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.checkpoint import checkpoint

import actreg
from dist_cases_window import micro_batch, shard_bounds

TOKENS = 12
IN_FEATURES = 5
EXPERTS = 4
MICRO = 2
STEPS = 4
RATE = 0.05
#: tokens of each rank per micro-batch (contiguous), by world size
SHARDS = {1: [[12], [12]], 2: [[7, 5], [3, 9]], 3: [[5, 0, 7], [0, 12, 0]]}

#: name -> (penalties of the router slot, trigger, checkpointed)
CASES: dict[str, tuple[str, str, bool]] = {
    "sign_softmax": (
        "[ExpertBias(4, 2, rate=0.05), LoadBalance(4, 2, 0.5)]",
        "update_bias",
        False,
    ),
    "centred_sigmoid": (
        "[ExpertBias(4, 2, rate=0.05, update='centred', score='sigmoid'), "
        "LoadBalance(4, 2, 0.5, score='sigmoid')]",
        "attach",
        False,
    ),
    "bias_only_checkpointed": ("[ExpertBias(4, 1, rate=0.05, update='centred')]", "update_bias", True),
}


def make_penalties(name: str) -> list[actreg.Penalty]:
    return eval(CASES[name][0], {k: getattr(actreg, k) for k in actreg.__all__})  # type: ignore[no-any-return]


def make_router() -> nn.Linear:
    torch.manual_seed(7)
    return nn.Linear(IN_FEATURES, EXPERTS).double()


def batch(step: int, micro: int) -> tuple[Tensor, Tensor]:
    """Global tokens ``[TOKENS, 5]`` and mask ``[TOKENS]`` of micro-batch ``micro`` of ``step``."""
    return micro_batch(900, step, micro)


def bounds(rank: int, world_size: int, micro: int) -> tuple[int, int]:
    return shard_bounds(SHARDS, rank, world_size, micro)


def train(rank: int, world_size: int, names: list[str]) -> dict[str, Any]:
    """Per case: bias after each optimizer step, LoadBalance losses per micro-batch, metrics after
    each step, the model's routing of the last micro-batch's global tokens, the collectives of
    ``loss()`` and of the update, and a state_dict round trip."""
    out: dict[str, Any] = {}
    for name in names:
        _, trigger, checkpointed = CASES[name]
        router = make_router()
        opt = torch.optim.SGD(router.parameters(), lr=0.0)  # a fixed router: the bias alone moves
        reg = actreg.ActivityRegularizer(router, {"router": make_penalties(name)}, observed=["router"])
        if trigger == "attach":
            reg.attach(opt)

        def logits_of(
            x: Tensor, mask: Tensor, reg: actreg.ActivityRegularizer = reg, router: nn.Module = router
        ) -> Tensor:
            logits = router(x)
            reg.observe("router", logits, mask)
            return logits

        biases, losses, metrics, collectives = [], [], [], []
        for step in range(STEPS):
            opt.zero_grad()
            for micro in range(MICRO):
                x, mask = batch(step, micro)
                start, stop = bounds(rank, world_size, micro)
                x, mask = x[start:stop], mask[start:stop]
                if checkpointed:  # recomputed in backward: must not be counted twice
                    logits = checkpoint(logits_of, x, mask, use_reentrant=False)
                else:
                    logits = logits_of(x, mask)
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    loss = reg.loss()
                collectives.append([e.name for e in prof.events() if e.name.startswith("c10d::")])
                (loss + 0.0 * logits.sum()).backward()
                losses.append(loss.item())
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                opt.step()
                if trigger == "update_bias":
                    reg.update_bias()
            collectives.append([e.name for e in prof.events() if e.name.startswith("c10d::")])
            biases.append(reg.expert_bias("router").double().numpy().copy())
            m = reg.metrics()
            metrics.append({k: m[k] for k in ("router/max_violation", "router/dead_experts")})
        x, _ = batch(STEPS - 1, MICRO - 1)
        routed = reg.route("router", router(x)).numpy().copy()
        state = reg.state_dict()
        again = actreg.ActivityRegularizer(
            make_router(), {"router": make_penalties(name)}, observed=["router"]
        )
        before = again.expert_bias("router").clone()
        again.load_state_dict(state)
        out[name] = {
            "bias": biases,
            "loss": losses,
            "metrics": metrics,
            "routed": routed,
            "collectives": collectives,
            "state_bias": state["expert_bias"]["router"].double().numpy().copy(),
            "loaded_bias": again.expert_bias("router").double().numpy().copy(),
            "fresh_bias_was_zero": bool((before == 0).all()),
        }
        reg.check()
        reg.remove()
        again.remove()
    return out
