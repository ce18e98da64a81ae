"""The demo model: an MLP whose hidden activations are the regularized layers.

Module names (the targets of ``--penalty`` patterns): ``fc1``, ``act1``, ``fc2``, ``act2``, ...,
``head``. ``act<i>`` are the ReLU outputs of hidden layer ``i``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

import actreg

from .config import build_penalties, default_penalties


class DigitsMLP(nn.Module):
    """``in -> [Linear -> ReLU] * len(hidden) -> Linear(classes)``."""

    def __init__(
        self, num_features: int = 64, hidden: Sequence[int] = (128, 64), num_classes: int = 10
    ) -> None:
        super().__init__()
        self.num_hidden = len(hidden)
        width = num_features
        for i, h in enumerate(hidden, start=1):
            self.add_module(f"fc{i}", nn.Linear(width, h))
            self.add_module(f"act{i}", nn.ReLU())
            width = h
        self.head = nn.Linear(width, num_classes)

    def hidden_names(self) -> list[str]:
        """Names of the hidden activation modules, ``["act1", "act2", ...]``."""
        return [f"act{i}" for i in range(1, self.num_hidden + 1)]

    def forward(self, x: Tensor) -> Tensor:
        for i in range(1, self.num_hidden + 1):
            x = getattr(self, f"act{i}")(getattr(self, f"fc{i}")(x))
        return self.head(x)


def verify_factory() -> tuple[nn.Module, tuple[Tensor, Tensor], dict[str, list[actreg.Penalty]]]:
    """Factory for ``actreg verify``: the demo MLP, an odd-sized batch (uneven shards), penalties.

    The penalties are the demo's defaults plus a few non-linear ones on other layers, so that the
    check exercises means, covariances, variances and a log-sum-exp.
    """
    g = torch.Generator().manual_seed(1234)
    model = DigitsMLP()
    x = torch.randn(37, 64, generator=g)
    y = torch.randint(0, 10, (37,), generator=g)
    penalties = build_penalties(default_penalties())
    penalties["fc2"] = [actreg.VarianceFloor(0.5), actreg.Covariance(1e-2)]
    penalties["head"] = [actreg.ZLoss(1e-3)]
    return model, (x, y), penalties
