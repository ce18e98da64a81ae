"""Worker functions for tests/test_moe.py: router balance penalties (``score=``, ``SequenceBalance``).

The problem: a float64 router (``Linear(5, 4)``) on ``SEQUENCES`` sequences of ``TIME`` tokens with
a padding mask. Data parallelism splits the sequences (uneven shards, an empty one at W = 3); context
parallelism splits the tokens of every sequence in two uneven parts (``CP_SPLIT``). Each rank feeds
its router logits through ``reg.observe(..., sequence=ids)`` with every token's *global* sequence
index. Nothing here computes a reference: tests/test_moe.py does, on the whole batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.profiler import ProfilerActivity, profile

import actreg

SEQUENCES = 6
TIME = 5
IN_FEATURES = 5
EXPERTS = 4
TOP_K = 2
STEPS = 2
LR = 0.5
#: sequences per data-parallel rank (contiguous; uneven, W=3 has an empty shard)
DP_SHARDS = {1: [6], 2: [4, 2], 3: [3, 0, 3], 4: [4, 2]}
#: tokens [0, CP_SPLIT) of every sequence on context-parallel rank 0, the rest on rank 1 (3 + 2)
CP_SPLIT = 3

#: penalty of each case, built from its source on every rank and in the reference's description
CASES: dict[str, str] = {
    "seq_softmax": "SequenceBalance(num_experts=4, top_k=2, weight=0.8, num_sequences=8)",
    "seq_sigmoid": "SequenceBalance(num_experts=4, top_k=2, weight=0.8, num_sequences=8, score='sigmoid')",
    "load_sigmoid": "LoadBalance(num_experts=4, top_k=2, weight=0.8, score='sigmoid')",
}


def make_penalty(name: str) -> actreg.Penalty:
    return eval(CASES[name], {k: getattr(actreg, k) for k in actreg.__all__})


def make_router() -> nn.Linear:
    torch.manual_seed(3)
    return nn.Linear(IN_FEATURES, EXPERTS).double()


def batch(step: int) -> tuple[Tensor, Tensor]:
    """The global batch of ``step``: inputs ``[SEQUENCES, TIME, 5]`` and a mask ``[SEQUENCES, TIME]``."""
    g = torch.Generator().manual_seed(500 + step)
    x = torch.randn(SEQUENCES, TIME, IN_FEATURES, generator=g, dtype=torch.float64) * 1.5
    mask = torch.rand(SEQUENCES, TIME, generator=g) > 0.25
    mask[:, 0] = True  # every sequence keeps a token on context-parallel rank 0
    mask[1, 1:] = False  # one sequence with a single kept token: none on context-parallel rank 1
    return x, mask


def dp_bounds(dp_rank: int, dp_size: int) -> tuple[int, int]:
    sizes = DP_SHARDS[dp_size]
    start = sum(sizes[:dp_rank])
    return start, start + sizes[dp_rank]


def _train(rank: int, names: list[str], dp_rank: int, dp_size: int, cp_rank: int | None) -> dict[str, Any]:
    """DDP over every rank, the regularizer on every rank; this rank's sequences (and, under context
    parallelism, its part of their tokens). Per case: per-step losses and averaged gradients."""
    start, stop = dp_bounds(dp_rank, dp_size)
    tokens = (
        slice(None) if cp_rank is None else (slice(0, CP_SPLIT) if cp_rank == 0 else slice(CP_SPLIT, None))
    )
    out: dict[str, Any] = {"rank": rank}
    for name in names:
        router = make_router()
        opt = torch.optim.SGD(router.parameters(), lr=LR)
        net = DDP(router)
        reg = actreg.ActivityRegularizer(net, {"router": make_penalty(name)}, observed=["router"])
        losses, grads, collectives = [], [], []
        for step in range(STEPS):
            x, mask = batch(step)
            x, mask = x[start:stop, tokens], mask[start:stop, tokens]
            ids = torch.arange(start, stop).unsqueeze(-1)  # [sequences, 1]: broadcast over tokens
            opt.zero_grad()
            logits = net(x)
            reg.observe("router", logits, mask, **({"sequence": ids} if name.startswith("seq") else {}))
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                loss = reg.loss()
            collectives.append([e.name for e in prof.events() if e.name.startswith("c10d::")])
            (loss + 0.0 * logits.sum()).backward()  # every parameter takes part, as DDP expects
            losses.append(loss.item())
            grads.append([p.grad.detach().numpy().copy() for p in router.parameters()])
            opt.step()
        reg.check()
        reg.remove()
        out[name] = {"loss": losses, "grads": grads, "collectives": collectives}
    return out


def data_parallel(rank: int, world_size: int, names: list[str]) -> dict[str, Any]:
    """W ranks of data parallelism: whole sequences, uneven shards."""
    return _train(rank, names, rank, world_size, None)


def data_context_parallel(rank: int, world_size: int, names: list[str]) -> dict[str, Any]:
    """4 ranks as DP 2 x CP 2 (``rank = 2 * dp + cp``): each sequence's tokens split 3 + 2 over
    the context-parallel pair; DDP averages over all 4 ranks, the regularizer's group is all 4."""
    assert world_size == 4 and dist.get_world_size() == 4
    out = _train(rank, names, rank // 2, 2, rank % 2)
    out["dp"], out["cp"] = rank // 2, rank % 2
    return out
