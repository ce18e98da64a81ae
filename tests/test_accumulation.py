"""Gradient accumulation: DDP ``no_sync()`` over k micro-batches (docs/accumulation.md).

Two recipes, each checked against one float64 process that sees the concatenated batches (written
from the published formulas in tests/reference.py, not through actreg), W = 2 ranks with uneven
shards, k = 3, two optimizer steps:

* ``micro``: ``reg.loss() / k`` in every micro-batch. Each is the global penalty of that
  micro-batch; for a sum penalty (L1) whose micro-batches hold the same number of global positions
  their mean *is* the window's penalty, for a statistic penalty (VarianceFloor) it is the mean of
  per-micro-batch global penalties -- what the test's reference computes for each.
* ``window``: ``reg.loss()`` once, in the last micro-batch: the exact penalty of the whole window's
  global batch for every penalty (padding masks too), one collective per optimizer step, and
  ``ema`` updated once per optimizer step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dist_cases_accumulation as cases
import reference
from problem import batch, make_model

K = 3
STEPS = 2
NAMES = ["L1", "VarianceFloor"]


def _reference(recipe: str, sync: str) -> dict:
    params = [p.detach().clone().requires_grad_(True) for p in make_model().parameters()]
    ema: dict[str, dict[str, torch.Tensor]] = {}
    losses = []
    for step in range(STEPS):
        micro = [batch(step * K + i) for i in range(K)]
        if recipe == "micro":
            total = 0.0
            for x, mask in micro:
                act = reference.activations(params, x, "1")
                keep = torch.ones_like(mask)
                value = sum(reference.direct(n, act, keep) for n in NAMES) / K
                losses.append(float(value.detach()))
                total = total + value
        else:
            x = torch.cat([m[0] for m in micro])
            mask = torch.cat([m[1] for m in micro])
            act = reference.activations(params, x, "1")
            if sync == "global":
                total = sum(reference.direct(n, act, mask) for n in NAMES)
            else:
                total = 0.0
                for n in NAMES:
                    s = reference.sums(n, act, mask)
                    old = ema.get(n)
                    ema[n] = reference.ema_update(old, s, 0.6)
                    total = total + reference.value_of(n, ema[n], ema[n]["n"] / (1 - 0.6 ** (step + 1)))
            losses.append(float(total.detach()))
        reference.sgd_step(total, params, cases.LR, allow_unused=True)
    return {"loss": losses, "params": [p.detach().numpy() for p in params]}


@pytest.mark.parametrize(
    ("recipe", "sync"), [("micro", "global"), ("window", "global"), ("window", "ema")]
)
def test_accumulated_gradients_match_the_window_reference(pools, recipe, sync):
    ref = _reference(recipe, sync)
    results = pools[2].run(cases.accumulate, recipe, sync, K, STEPS, timeout=120)
    for rank, got in enumerate(results):
        np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-9, err_msg=f"rank {rank}")
        for p, r in zip(got["params"], ref["params"], strict=True):
            np.testing.assert_allclose(p, r, rtol=1e-9, atol=1e-12, err_msg=f"{recipe} {sync} rank {rank}")
        assert got["collectives"] == (STEPS * K if recipe == "micro" else STEPS)
