"""Uneven numbers of steps per rank under ``torch.distributed.algorithms.Join``.

Ranks run different numbers of batches (0 and 1 included) inside ``Join([ddp_model, *regs])``;
W = 2 and 3 (W = 3 has an empty shard), models with and without buffers that DDP broadcasts at
every forward (``BatchNorm1d``, a constant buffer), ``global`` and ``ema``, with and without
``weights=``. At every step the penalty is the global penalty of the ranks still training (plus
the weight penalty of one replica), and the parameters follow single-process SGD on the
concatenated batch of those ranks -- written here from the published formulas (tests/reference.py),
not through actreg. Nothing hangs: a hang fails the pool task at its timeout.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch

import dist_cases_join
import reference
from dist_cases_join import WEIGHT_L2
from problem import DECAY, LR, batch, make_model, shard_bounds

NAMES = ["L1", "VarianceFloor"]
#: batch counts per rank: at most one batch (0 from the start included) and longer runs
BATCHES = {
    2: [(1, 2), (0, 2), (2, 1)],
    3: [(1, 2, 4), (1, 1, 2), (0, 1, 2), (2, 1, 2), (2, 3, 5)],
}
BUFFERS = [None, "bn", "const"]


def _reference(case: dict[str, Any], world_size: int) -> dict[str, Any]:
    """Float64 single-process SGD on the rows of the ranks still training at each step."""
    params = [p.detach().clone().requires_grad_(True) for p in make_model().parameters()]
    batches = case["batches"]
    accumulate = case.get("accumulate", 1)
    ema: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    out: dict[str, Any] = {"loss": [], "values": [], "weights": []}

    def step_loss(step: int, ranks: list[int], t: int) -> tuple[torch.Tensor, list[dict], torch.Tensor]:
        x, mask = batch(step)
        rows = [i for r in ranks for i in range(*shard_bounds(r, world_size))]
        act = reference.activations(params, x[rows], "1")
        total = act.sum() * 0.0
        values = []
        for k, (names, sync) in enumerate(case["regs"]):
            per_name = {}
            for name in names:
                if sync == "global":
                    v = reference.direct(name, act, mask[rows])
                else:
                    ema[k, name] = reference.ema_update(
                        ema.get((k, name)), reference.sums(name, act, mask[rows]), DECAY
                    )
                    v = reference.value_of(name, ema[k, name], ema[k, name]["n"] / (1 - DECAY**t))
                per_name[name] = float(v.detach())
                total = total + v
            values.append(per_name)
        weights = params[0].pow(2).sum() + params[2].pow(2).sum()
        weights = WEIGHT_L2 * weights if case.get("weights") else weights * 0.0
        return total + weights, values, weights

    grads = [torch.zeros_like(p) for p in params]
    for step in range(max(batches)):
        active = [r for r in range(world_size) if batches[r] > step]
        loss, values, weights = step_loss(step, active, step + 1)
        out["loss"].append(float(loss.detach()))
        out["values"].append(values)
        out["weights"].append(float(weights.detach()))
        step_grads = torch.autograd.grad(loss, params, allow_unused=True)  # (b2 is never used)
        grads = [g if s is None else g + s for g, s in zip(grads, step_grads, strict=True)]
        if (step + 1) % accumulate == 0:
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p -= LR * g
            grads = [torch.zeros_like(p) for p in params]
    out["params"] = [p.detach().numpy() for p in params]
    with torch.no_grad():
        after, _, _ = step_loss(0, list(range(world_size)), max(batches) + 1)
    out["after"] = float(after)
    return out


def _check(case: dict[str, Any], world_size: int, results: list[dict[str, Any]]) -> None:
    ref = _reference(case, world_size)
    batches = case["batches"]
    last = max(range(world_size), key=lambda r: batches[r])  # a rank that trains to the end
    what = f"case {case}"
    for rank, got in enumerate(results):
        n = batches[rank]
        assert len(got["loss"]) == n, what
        np.testing.assert_allclose(got["loss"], ref["loss"][:n], rtol=1e-9, err_msg=f"{what} rank {rank}")
        for step, metrics in enumerate(got["metrics"]):
            for name, value in ref["values"][step][0].items():
                np.testing.assert_allclose(
                    metrics[f"body.1/{name}"], value, rtol=1e-9, atol=1e-15, err_msg=f"{what} rank {rank}"
                )
            if case.get("weights"):
                np.testing.assert_allclose(
                    metrics["weights/WeightL2"],
                    ref["weights"][step],
                    rtol=1e-9,
                    err_msg=f"{what} rank {rank}",
                )
        for p, r in zip(got["params"], ref["params"], strict=True):
            # Join's post-hook gives every rank the last joiner's parameters
            np.testing.assert_allclose(p, r, rtol=1e-9, atol=1e-12, err_msg=f"{what} rank {rank}")
        # the joined ranks committed the shadow steps: the same state and figures everywhere
        assert got["steps"] == results[last]["steps"], what
        for k, ema in enumerate(got["ema"]):
            assert ema.keys() == results[last]["ema"][k].keys(), what
            for key, value in ema.items():
                np.testing.assert_array_equal(value, results[last]["ema"][k][key], err_msg=f"{what} {key}")
        assert got["after_metrics"] == results[last]["after_metrics"], f"{what} rank {rank}"
        assert got["after_metrics"][0] == results[last]["metrics"][-1], f"{what} rank {rank}"
        np.testing.assert_allclose(got["after"], ref["after"], rtol=1e-9, err_msg=f"{what} rank {rank}")
    for k, (_, sync) in enumerate(case["regs"]):
        assert results[last]["steps"][k] == (max(batches) if sync == "ema" else 0), what


@pytest.mark.parametrize("world_size", [2, 3])
def test_uneven_steps_under_join_are_exact_and_do_not_hang(pools, world_size):
    """Every batch pattern with global/ema x with/without weights, each with a buffer kind in turn
    (none, BatchNorm1d, constant: every pattern meets all three), against float64."""
    cases = [
        {
            "batches": list(b),
            "regs": [(NAMES, sync)],
            "weights": weights,
            "buffers": BUFFERS[(j + k) % len(BUFFERS)],
        }
        for j, b in enumerate(BATCHES[world_size])
        for k, (sync, weights) in enumerate(itertools.product(["global", "ema"], [False, True]))
    ]
    results = pools[world_size].run(dist_cases_join.join_cases, cases, timeout=120)
    for i, case in enumerate(cases):
        _check(case, world_size, [results[rank][i] for rank in range(world_size)])


@pytest.mark.parametrize("world_size", [2, 3])
def test_two_regularizers_in_one_join_in_either_loss_order(pools, world_size):
    """Join([ddp, reg_a, reg_b]) with loss() called as listed and the other way round."""
    batches = {2: [0, 2], 3: [1, 0, 3]}[world_size]
    cases = [
        {
            "batches": batches,
            "regs": [(["L1"], "global"), (["VarianceFloor"], "ema")],
            "order": order,
            "buffers": "bn",
            "weights": True,
        }
        for order in ([0, 1], [1, 0])
    ]
    results = pools[world_size].run(dist_cases_join.join_cases, cases, timeout=90)
    for i, case in enumerate(cases):
        _check(case, world_size, [results[rank][i] for rank in range(world_size)])


def test_two_fused_regularizers_under_join_build_their_values_one_at_a_time(pools):
    """Two regularizers with fused kernels in one Join, rank 0 joined from the start: its two
    shadow steps run in threads and compile their values at once (tracing is not re-entrant: the
    soak with fused kernels found one of them falling back with a warning). Exact, no warning."""
    regs = [(["L1"], "global"), (["L2"], "global")]
    case = {"batches": [0, 2], "regs": regs, "order": [1, 0], "fused": True}
    results = pools[2].run(dist_cases_join.join_cases, [case], timeout=180)
    _check(case, 2, [results[rank][0] for rank in range(2)])
    for rank in range(2):
        assert results[rank][0]["warnings"] == [], (rank, results[rank][0]["warnings"])


def test_gradient_accumulation_with_no_sync_under_join(pools):
    """Micro-batches under ``ddp.no_sync()`` (DDP's join hook skips the backward): shadows still pair."""
    cases = [
        {"batches": b, "regs": [(NAMES, sync)], "accumulate": 2, "weights": True, "buffers": "const"}
        for b, sync in [([0, 2, 4], "global"), ([2, 4, 2], "ema")]
    ]
    results = pools[3].run(dist_cases_join.join_cases, cases, timeout=90)
    for i, case in enumerate(cases):
        _check(case, 3, [results[rank][i] for rank in range(3)])


def test_regularizer_listed_before_the_model_is_refused_on_every_rank(pools):
    results = pools[3].run(dist_cases_join.refused_order, timeout=60)
    for result in results:
        assert result["refused"] is not None
        assert "Join([ddp_model, reg])" in result["refused"]


def test_join_that_divides_by_the_ranks_still_training_is_refused_on_every_rank(pools):
    """``divide_by_initial_world_size=False``: DDP would divide by the ranks still training, and the
    penalty's gradient (surrogate factor W) would be W / C too large: refused at ``Join(...)``."""
    results = pools[3].run(dist_cases_join.refused_order, False, timeout=60)
    for result in results:
        assert result["refused"] is not None
        assert "divide_by_initial_world_size=False" in result["refused"]


def test_error_decided_after_a_rank_joined_is_raised_on_the_joined_rank_too(pools):
    """A non-finite step while rank 0 has joined: the next loss() raises on the training ranks, and
    rank 0 (in Join's loop, shadowing) raises the same error instead of waiting in a collective."""
    results = pools[3].run(dist_cases_join.error_after_join, [1, 3, 3], 1, timeout=50)
    for rank, result in enumerate(results):
        assert result["error"] == "NonFiniteStatisticError", f"rank {rank}: {result}"
        assert "step 2" in result["message"], f"rank {rank}: {result['message']}"
