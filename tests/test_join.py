"""Uneven numbers of steps per rank under ``torch.distributed.algorithms.Join``.

W = 3 ranks with 2, 3 and 5 batches (rank 1's shard is empty): at every step the penalty is the
global penalty of the ranks still training, and the parameters follow single-process SGD on the
concatenated batch of those ranks -- written here from the published formulas (tests/reference.py),
not through actreg. Nothing hangs: the ranks that ran out shadow the statistics collective.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dist_cases
import reference
from problem import DECAY, LR, batch, make_model, shard_bounds

BATCHES = [2, 3, 5]
NAMES = ["L1", "VarianceFloor"]


def _reference(sync: str) -> dict:
    params = [p.detach().clone().requires_grad_(True) for p in make_model().parameters()]
    ema: dict[str, dict[str, torch.Tensor]] = {}
    losses = []
    for step in range(max(BATCHES)):
        x, mask = batch(step)
        rows = [i for r, n in enumerate(BATCHES) if n > step for i in range(*shard_bounds(r, 3))]
        act = reference.activations(params, x[rows], "1")
        if sync == "global":
            loss = sum(reference.direct(name, act, mask[rows]) for name in NAMES)
        else:
            loss = 0.0
            for name in NAMES:
                s = reference.sums(name, act, mask[rows])
                old = ema.get(name)
                ema[name] = reference.ema_update(old, s, DECAY)
                n_bessel = ema[name]["n"] / (1 - DECAY ** (step + 1))
                loss = loss + reference.value_of(name, ema[name], n_bessel)
        losses.append(float(loss.detach()))
        reference.sgd_step(loss, params, LR, allow_unused=True)
    return {"loss": losses, "params": [p.detach().numpy() for p in params]}


@pytest.mark.parametrize("sync", ["global", "ema"])
def test_uneven_steps_under_join_are_exact_and_do_not_hang(pools, sync):
    ref = _reference(sync)
    results = pools[3].run(dist_cases.join_uneven, BATCHES, NAMES, sync, False, timeout=90)
    for rank, got in enumerate(results):
        assert len(got["loss"]) == BATCHES[rank]
        expected = ref["loss"][: BATCHES[rank]]
        np.testing.assert_allclose(got["loss"], expected, rtol=1e-9, err_msg=f"rank {rank}")
        for p, r in zip(got["params"], ref["params"], strict=True):
            # DDP under Join keeps stepping the joined ranks' replicas with the averaged gradients
            np.testing.assert_allclose(p, r, rtol=1e-9, atol=1e-12, err_msg=f"rank {rank}")
        # the joined ranks committed the shadow steps: the same state everywhere
        assert got["step"] == results[0]["step"]
        assert got["ema"].keys() == results[0]["ema"].keys()
        for key, value in got["ema"].items():
            np.testing.assert_array_equal(value, results[0]["ema"][key], err_msg=f"rank {rank} {key}")
        assert got["after"] == results[0]["after"]
    assert results[0]["step"] == (max(BATCHES) if sync == "ema" else 0)


def test_regularizer_listed_before_the_model_is_refused_on_every_rank(pools):
    results = pools[3].run(dist_cases.join_uneven, BATCHES, NAMES, "global", True, timeout=60)
    for result in results:
        assert result["refused"] is not None
        assert "Join([ddp_model, reg])" in result["refused"]
