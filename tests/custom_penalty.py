"""The user-written penalty shown in the README (kept in sync with it by test_custom_penalty_doc)."""

from __future__ import annotations

import actreg


# --8<-- [start:custom]
class MeanTarget(actreg.Penalty):
    """weight * sum_j (mean_i x_ij - target)^2: pull every unit's mean activation to a target."""

    def __init__(self, weight: float, target: float) -> None:
        self.weight, self.target = weight, target

    def statistic_shapes(self, d):
        return {"sum": (d,), "count": ()}

    def statistics(self, x):  # x: [m kept positions, d features] of this rank's shard
        return {"sum": x.sum(0), "count": actreg.count_of(x)}

    def value(self, s):  # s: global sums (or their moving average)
        mean = s["sum"] / actreg.nonzero(s["count"])
        return self.weight * ((mean - self.target) ** 2).sum() * (s["count"] > 0)


# --8<-- [end:custom]
