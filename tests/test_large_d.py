"""Gram matrices at large d: rows travel instead of the d x d sums, exact either way.

DeCov and Covariance on a 48-wide layer with shards of at most 5 positions: from the second step
on, ``W * rows * d`` (at most 3 * 4 * 48 = 576) is smaller than ``d * d`` (2304), so each rank sends
its centred rows into its own region of the one buffer and every rank forms the global Gram after
the collective. Gradients and values must equal a single-process float64 reference written from
the published formulas (torch.cov) -- with uneven shards and an empty one, in global and ema mode.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dist_cases
import reference
from problem import DECAY, LR, SHARDS, shard_bounds


def _reference(sync: str, steps: int = 3) -> dict[str, list]:
    model = dist_cases.make_wide_model()
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    ema = None
    losses, grads = [], []
    for step in range(steps):
        h = torch.tanh(dist_cases.wide_batch(step) @ params[0].T + params[1])
        if sync == "global":
            c_b = torch.cov(h.T, correction=0)
            c_u = torch.cov(h.T)
            off = lambda c: c.pow(2).sum() - torch.diagonal(c).pow(2).sum()  # noqa: E731
            loss = 9.0 * 0.5 * off(c_b) + 7.0 * off(c_u) / h.shape[1]
        else:
            s = {"s": h.sum(0), "o": h.T @ h, "n": torch.tensor(float(h.shape[0]), dtype=torch.float64)}
            ema = reference.ema_update(ema, s, DECAY)
            nb = ema["n"] / (1 - DECAY ** (step + 1))
            loss = reference.value_of("DeCov", ema, nb) + reference.value_of("Covariance", ema, nb)
        losses.append(loss.item())
        grads.append([g.numpy().copy() for g in reference.sgd_step(loss, params, LR)])
    return {"loss": losses, "grads": grads}


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("sync", ["global", "ema"])
def test_rows_instead_of_gram_is_exact(pools, sync, world_size):
    ref = _reference(sync)
    results = pools[world_size].run(dist_cases.gram_rows, sync)
    capacity, d = max(SHARDS[world_size]), dist_cases.WIDE
    for rank, got in enumerate(results):
        assert got["error"] is None, got["error"]
        for step in range(3):
            assert got["loss"][step] == pytest.approx(ref["loss"][step], rel=1e-9), (rank, step)
            for g, r in zip(got["grads"][step], ref["grads"][step], strict=True):
                np.testing.assert_allclose(g, r, rtol=1e-7, atol=1e-12, err_msg=f"rank {rank} step {step}")
        # one collective per step (DDP's own gradient all_reduce aside), with the rows -- a smaller
        # buffer than the Gram -- from the first step on in global mode; ema's first step sends the
        # Gram (its moving average is d x d: the first step starts it)
        for step, sizes in enumerate(got["sizes"]):
            if step == 0:  # (the first step's agreement gathers objects)
                if sync == "ema":
                    assert sizes["sent"][0] > d * d, sizes
                    continue
            else:
                assert sizes["collectives"] == ["c10d::allreduce_"], sizes  # still one collective
            (sent,) = sizes["sent"]
            assert world_size * capacity * d <= sent < d * d, sizes
    assert any(abs(v) > 1e-3 for v in np.concatenate([g.ravel() for g in ref["grads"][1]]))


def test_more_positions_than_the_rows_capacity_is_an_error_on_every_rank(pools):
    results = pools[2].run(dist_cases.gram_rows, "global", 3, True)
    # rank 0 recorded 10 positions in step 2 with a capacity of 5: the step's penalty is zero and
    # the next call raises on both ranks, rank 0 with its own message
    assert "exceed the 5 rows per rank" in results[0]["error"] and "step 2" in results[0]["error"]
    assert "recording failed on rank 0 ('1') in step 2" in results[1]["error"]
    for got in results:
        assert len(got["loss"]) == 2 and got["loss"][1] == 0.0


def _kernel_reference(width: int, world_size: int, steps: int) -> dict[str, list]:
    """Single process, float64, torch.cov: the global batch of every step (without the position
    that the last rank masks in step 0), DeCov(9) + Covariance(7), plain SGD."""
    model = dist_cases.make_wide_model(width)
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    masked = shard_bounds(world_size - 1, world_size)[0]
    losses, grads = [], []
    for step in range(steps):
        x = dist_cases.wide_batch(step)
        if step == 0:
            x = torch.cat([x[:masked], x[masked + 1 :]])
        h = torch.tanh(x @ params[0].T + params[1])
        off = lambda c: c.pow(2).sum() - torch.diagonal(c).pow(2).sum()  # noqa: E731
        loss = 9.0 * 0.5 * off(torch.cov(h.T, correction=0)) + 7.0 * off(torch.cov(h.T)) / width
        losses.append(loss.item())
        grads.append([g.numpy().copy() for g in reference.sgd_step(loss, params, LR)])
    return {"loss": losses, "grads": grads}


def test_wide_layer_with_few_rows_never_forms_a_d_by_d_tensor(pools):
    """d = 600 >> n = 7 rows (global mode, W = 2): from the first step on the rows travel and the
    penalty and its gradient come from the n x n kernel of the gathered rows -- no operand of any
    op (forward, loss(), backward; profiler shapes) has d * d elements, and values and gradients
    equal the float64 reference. Rank 0 records in two calls per step, the last rank masks a
    position in the first step (whose rows are moved from each rank's own shift to the common one)."""
    width, world_size, steps = 600, 2, 3
    ref = _kernel_reference(width, world_size, steps)
    capacity = max(SHARDS[world_size])
    for rank, got in enumerate(pools[world_size].run(dist_cases.wide_kernel, width, steps)):
        assert got["rows"] == {0: capacity}, got["rows"]
        for step in range(steps):
            # the largest operands: the buffer (its row area: W * capacity * d = 6000) and the first
            # step's pickled proposals, far below d * d = 360000
            assert got["largest"][step] < width * width // 20, (rank, step, got["largest"])
            assert got["loss"][step] == pytest.approx(ref["loss"][step], rel=1e-9), (rank, step)
            for g, r in zip(got["grads"][step], ref["grads"][step], strict=True):
                np.testing.assert_allclose(g, r, rtol=1e-7, atol=1e-12, err_msg=f"rank {rank} step {step}")
    assert all(abs(v) > 1e-4 for v in (ref["grads"][0][0].max(), ref["grads"][2][0].max()))
