"""The shared test problem: a tiny float64 model, per-step global batches, uneven shards.

Imported by the worker processes (which train through actreg) and by the tests (which compute the
single-process reference). Nothing here touches actreg.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

GLOBAL_BATCH = 7
TIME = 3
IN_FEATURES = 5
HIDDEN = 6
EXPERTS = 4
STEPS = 3
LR = 0.3
DECAY = 0.6

#: contiguous shard sizes of the global batch per world size (uneven; W=3 has an empty shard)
SHARDS = {1: [7], 2: [5, 2], 3: [4, 0, 3]}


def shard_bounds(rank: int, world_size: int) -> tuple[int, int]:
    sizes = SHARDS[world_size]
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def make_model() -> nn.Sequential:
    """Linear(5, 6) -> Sigmoid -> Linear(6, 4): module "1" is a [0, 1] hidden layer, "2" router logits."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN), nn.Sigmoid(), nn.Linear(HIDDEN, EXPERTS)).double()


def batch(step: int) -> tuple[Tensor, Tensor]:
    """Global batch of step ``step``: inputs [N, T, 5] and a position mask [N, T]."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, TIME, IN_FEATURES, generator=g, dtype=torch.float64) * 1.5
    mask = torch.rand(GLOBAL_BATCH, TIME, generator=g) > 0.3
    mask[0, :2] = True  # at least one kept time-pair
    return x, mask


#: (name, constructor source, module pattern). Weights give gradients of similar size.
CASES: dict[str, tuple[str, str]] = {
    "L1": ("L1(weight=0.7)", "1"),
    "L2": ("L2(weight=0.4)", "1"),
    "AR": ("AR(alpha=0.9)", "1"),
    "TAR": ("TAR(beta=1.7, time_dim=1)", "1"),
    "KLSparsity": ("KLSparsity(target=0.2, weight=0.8)", "1"),
    "DeCov": ("DeCov(weight=9.0)", "1"),
    "VarianceFloor": ("VarianceFloor(weight=1.1, gamma=0.6, eps=1e-4)", "1"),
    "Covariance": ("Covariance(weight=7.0)", "1"),
    "LoadBalance": ("LoadBalance(num_experts=4, top_k=2, weight=0.9)", "2"),
    "ZLoss": ("ZLoss(weight=0.05)", "2"),
}
