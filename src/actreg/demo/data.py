"""The digits data (scikit-learn's bundled ``load_digits``, no download) and its sharding.

Every step takes one *global* batch of ``batch_size`` samples (the last one of an epoch may be
smaller) from a per-epoch permutation, and splits it contiguously over the ranks: rank ``r`` of
``W`` gets ``batch[lo:hi]`` with :func:`shard_bounds`. Shards differ by at most one sample when the
batch does not divide -- nothing is padded or duplicated -- so the global batch, and therefore a
``sync="global"`` run, is the same whatever ``W`` is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._deps import require


@dataclass
class Digits:
    """Standardized 8x8 digit images (``[n, 64]`` float32) and labels (``[n]`` int64)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def num_classes(self) -> int:
        return 10

    def to(self, device: torch.device) -> Digits:
        return Digits(*(t.to(device) for t in (self.x_train, self.y_train, self.x_test, self.y_test)))


def load_digits_split(seed: int, test_fraction: float = 0.2) -> Digits:
    """The 1797 digits, split train/test with a seeded permutation, standardized with train stats."""
    datasets = require("sklearn.datasets")
    bunch = datasets.load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32)
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(x.shape[0], generator=g)
    n_test = max(1, math.ceil(test_fraction * x.shape[0]))
    test, train = order[:n_test], order[n_test:]
    mean = x[train].mean(0)
    std = x[train].std(0).clamp_min(1.0)  # constant border pixels stay ~0
    x = (x - mean) / std
    return Digits(x[train], y[train], x[test], y[test])


def shard_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """Contiguous share ``[lo, hi)`` of ``n`` items for ``rank``; sizes differ by at most 1.

    The first ``n % world_size`` ranks get one extra item. A rank may get nothing (``n < W``).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad rank {rank} of world size {world_size}")
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The sample order of ``epoch``: a permutation drawn from a generator seeded by (seed, epoch).

    Independent of earlier epochs, so a resumed run sees exactly the same batches. The generator's
    seed is ``seed * 100003 + epoch + 1`` modulo 2**64: torch takes seeds modulo 2**64 (``-1`` is
    ``2**64 - 1``) but refuses integers outside [-2**63, 2**64), so the reduction gives every seed
    the order it had before and lets seeds above ~1.8e14 work (see ``SEED_RANGE`` in ``config``).
    """
    g = torch.Generator().manual_seed((seed * 100_003 + epoch + 1) % 2**64)
    return torch.randperm(n, generator=g)


def global_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[Tensor]:
    """Index tensors of the epoch's global batches (the last one may be smaller)."""
    return list(torch.split(epoch_order(n, seed, epoch), batch_size))
