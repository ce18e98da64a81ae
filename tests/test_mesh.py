"""A 2-D device mesh (4 gloo ranks as 2 x 2, ``("dp", "tp")``): ``process_group`` is the data-parallel
group, and actreg reduces over it only.

On every rank the loss and the DDP-averaged gradients must equal a single-process float64 reference
trained on *its* dp group's concatenated batch (uneven shards, a padding mask, 2 SGD steps), and
the two dp groups, whose data differ, must get different penalties. The reference is written from
the penalties' formulas (tests/reference.py), not through actreg.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import dist_cases_mesh
import reference
from dist_cases_mesh import STEPS, group_batch
from problem import CASES, DECAY, LR, make_model

NAMES = ["L1", "VarianceFloor", "DeCov", "LoadBalance"]


@functools.cache
def expected(name: str, sync: str, group: int) -> dict[str, list]:
    """Plain SGD on one process over dp group ``group``'s batches, the penalty as the only loss."""
    params = [p.detach().clone().requires_grad_(True) for p in make_model().parameters()]
    ema: dict[str, torch.Tensor] | None = None
    losses, grads = [], []
    for step in range(STEPS):
        x, mask = group_batch(step, group)
        act = reference.activations(params, x, CASES[name][1])
        if sync == "global":
            loss = reference.direct(name, act, mask)
        else:
            s = reference.sums(name, act, mask)
            ema = reference.ema_update(ema, s, DECAY)
            loss = reference.value_of(name, ema, ema["n"] / (1 - DECAY ** (step + 1)))
        losses.append(loss.item())
        grads.append([g.numpy().copy() for g in reference.sgd_step(loss, params, LR, allow_unused=True)])
    return {"loss": losses, "grads": grads}


@pytest.mark.parametrize("sync", ["global", "ema"])
def test_penalty_of_each_dp_group_is_its_own_global_batch(pools, sync: str) -> None:
    ranks = pools[4].run(dist_cases_mesh.mesh_train, NAMES, sync, timeout=240.0)
    assert sorted((r["dp"], r["tp"]) for r in ranks) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for name in NAMES:
        for rank, got in enumerate(ranks):
            ref = expected(name, sync, got["tp"])  # the tp coordinate names the dp group
            where = f"{name} {sync} rank {rank} (dp {got['dp']}, tp {got['tp']})"
            np.testing.assert_allclose(got[name]["loss"], ref["loss"], rtol=1e-7, atol=1e-12, err_msg=where)
            for step in range(STEPS):
                for i, (g, r) in enumerate(zip(got[name]["grads"][step], ref["grads"][step], strict=True)):
                    np.testing.assert_allclose(
                        g, r, rtol=1e-7, atol=1e-12, err_msg=f"{where} step {step} param {i}"
                    )
        by_group = {got["tp"]: got[name]["loss"] for got in ranks}
        assert not np.allclose(by_group[0], by_group[1], rtol=1e-3), (name, by_group)


def test_tensor_parallel_weights_are_exact_on_their_group_and_refused_elsewhere(pools) -> None:
    """A weight penalty sums local shards over the regularizer's group: exact when the group is the
    ranks the parameter is sharded over, a ValueError on every rank otherwise (a ColwiseParallel
    weight with the regularizer on the dp group used to give 2x the local tp shard's sum)."""
    ranks = pools[4].run(dist_cases_mesh.tp_weights, timeout=240.0)
    full = {name: p.detach() for name, p in make_model().named_parameters()}  # float64, unsharded
    for rank, got in enumerate(ranks):
        tp_ranks = sorted(r for r, other in enumerate(ranks) if other["dp"] == got["dp"])
        for name, mesh_words in (
            ("0.weight", ["(Shard(dim=0),)", "mesh dims ('tp',)"]),
            ("2.weight", ["(Replicate(), Shard(dim=0))", "mesh dims ('dp', 'tp')"]),
        ):
            message = got["refused"][name]
            who = message.split("]")[0]  # "[actreg, rank 1 (global rank 2)" on the dp group
            assert who == f"[actreg, rank {rank}" or who.endswith(f"(global rank {rank})"), message
            for word in [
                repr(name),
                *mesh_words,
                f"global ranks {tp_ranks}",
                "process_group",
                "weight decay",
            ]:
                assert word in message, f"rank {rank} {name}: {word!r} not in\n{message}"
        for name, placements in (
            ("0.weight", "(Shard(dim=0),)"),
            ("2.weight", "(Replicate(), Shard(dim=0))"),
        ):
            exact = got["exact"][name]
            assert exact["placements"] == placements
            p = full[name]
            np.testing.assert_allclose(
                exact["loss"], 0.3 * float(p.pow(2).sum()), rtol=1e-12, err_msg=f"rank {rank} {name}"
            )
            np.testing.assert_allclose(
                exact["grad"], (0.6 * p).numpy(), rtol=1e-12, atol=1e-15, err_msg=f"rank {rank} {name}"
            )
