"""Named presets of the demo's settings, chosen with ``--scenario NAME`` (``actreg train`` / ``compare``).

A scenario only changes *defaults*: precedence is built-in defaults < scenario < ``--config`` TOML <
options given on the command line. ``default`` is the demo as it always was.

``vicreg``: VICReg's variance and covariance terms on the first hidden layer, with global batches of
8 split over 4 ranks -- 2 samples per rank. The covariance of 2 samples is a rank-1 matrix, so the
per-rank (``sync="local"``) covariance term is quartic in the difference of the two samples and
outweighs the variance floor: every unit's spread shrinks, and the penalty on the test set ends
higher than with no penalty at all. ``sync="global"`` optimizes the penalty of the 8-sample batch
(what one process would) and keeps the spread (``actreg compare --scenario vicreg``; numbers in the
README).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: The scenario used when none is named: the demo's built-in defaults, unchanged.
DEFAULT_SCENARIO = "default"


@dataclass(frozen=True)
class Scenario:
    """A named set of default settings (``TrainConfig`` field names -> values)."""

    name: str
    summary: str
    settings: Mapping[str, Any] = field(default_factory=dict)

    def defaults(self) -> dict[str, Any]:
        """A fresh copy of the settings (lists and tables may be changed by the caller)."""
        return copy.deepcopy(dict(self.settings))


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            DEFAULT_SCENARIO, "L1 + DeCov on the hidden layers, 2 ranks, batch 64 (the built-in defaults)"
        ),
        Scenario(
            "vicreg",
            "VICReg variance + covariance on act1 with 2 samples per rank (4 ranks, batch 8, 2 epochs): "
            "per-rank penalties shrink the features",
            {
                "nproc": 4,
                "batch_size": 8,
                "epochs": 2,
                "penalties": {"act1": ["VarianceFloor:1", "Covariance:0.01"]},
            },
        ),
    )
}


def scenario_names() -> list[str]:
    """The known scenario names, ``default`` first."""
    return list(SCENARIOS)


def get_scenario(name: str) -> Scenario:
    """The scenario called ``name``; ``ValueError`` listing the choices for an unknown one."""
    try:
        return SCENARIOS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; choose from: {', '.join(SCENARIOS)}") from None
