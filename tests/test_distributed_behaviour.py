"""Communication counts, edge cases and failure behaviour across gloo ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dist_cases
import reference
from problem import CASES, DECAY, batch, make_model, shard_bounds

NAMES = list(CASES)


# ------------------------------------------------------------------ communication
@pytest.mark.parametrize("sync", ["global", "ema"])
def test_exactly_one_collective_per_step_and_none_in_backward(pools, sync):
    for result in pools[2].run(dist_cases.count_collectives, sync):
        first, *later = result["loss"]
        assert len(first) >= 1  # the one-time layout check may add collectives on the first call
        for ops in later:
            assert ops == ["c10d::allreduce_"], ops
        assert all(ops == [] for ops in result["backward"]), result["backward"]


def test_local_mode_communicates_only_the_first_step_agreement(pools):
    for result in pools[2].run(dist_cases.count_collectives, "local"):
        # the first loss() compares every rank's settings (one all_gather_object); then nothing
        assert result["loss"][0] and all("gather" in op or "broadcast" in op for op in result["loss"][0])
        assert all(ops == [] for ops in result["loss"][1:] + result["backward"])


# ------------------------------------------------------------------ layout mismatch
@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("penalty", ["'1'", "L2(weight=0.1)", "L1(weight=0.1)", "rank 1"]),
        ("pattern", ["'2'", "ZLoss", "rank 1"]),
        ("weight", ["L1(weight=0.2)", "rank 1"]),
        ("sync", ["sync", "'ema'", "'global'"]),
        ("local", ["sync", "'local'", "'global'"]),  # used to hang: local skipped the agreement
        ("nonfinite", ["nonfinite", "'skip'", "'raise'"]),
        ("record_eval", ["record_eval", "True", "False"]),
        # weight penalties on different parameters used to be averaged silently (same label, count)
        ("weight_params", ["weights", "'2.weight [4, 6]'", "'0.weight [6, 5]'", "rank 1"]),
        ("weight_shapes", ["weights", "'2.weight [3, 6]'", "'2.weight [4, 6]'", "rank 1"]),
    ],
)
def test_layout_mismatch_raises_on_every_rank(pools, kind, words):
    results = pools[3].run(dist_cases.layout_mismatch, kind, timeout=60)
    for rank, message in enumerate(results):
        assert message != "no error", f"rank {rank} did not raise"
        for w in words:
            assert w in message, (rank, w, message)
        assert f"rank {rank}" in message  # says which rank is speaking


def test_recording_error_on_one_rank_raises_everywhere(pools):
    results = pools[2].run(dist_cases.recording_error, timeout=60)
    assert all(r.startswith("value 0.0: ") for r in results), results  # the failed step's penalty
    assert "does not broadcast" in results[1] and "rank 1" in results[1] and "step 1" in results[1]
    assert "recording failed on rank 1 ('1') in step 1" in results[0]
    # the pool is still usable afterwards (nobody hangs in a collective)
    assert "[actreg, rank 0]" in pools[2].run(dist_cases.recording_error, timeout=60)[0]


def test_nonfinite_raises_on_every_rank(pools):
    for message in pools[2].run(dist_cases.nonfinite, "raise", timeout=60):
        assert message.startswith("raised:") and "'1'" in message and "nonfinite='skip'" in message
        assert "step 1" in message


def test_nonfinite_skip_gives_zero_on_every_rank(pools):
    """The step's penalty is 0 on every rank; rank 1 (finite activations, NaN statistics only through
    rank 0's) gets exactly zero gradient -- no NaN flows back through the skipped penalty."""
    results = pools[2].run(dist_cases.nonfinite, "skip", timeout=60)
    assert results[1] == "value: 0.0 skipped: 1.0 finite: True"
    assert results[0].startswith("value: 0.0 skipped: 1.0")


# ------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("sync", ["global", "ema"])
def test_module_skipped_on_one_rank(pools, sync):
    """Module "2" runs on rank 0 only; its statistics are rank 0's, exactly."""
    results = pools[3].run(dist_cases.skipped_module, sync)
    params = [p.detach().clone().requires_grad_(True) for p in make_model().parameters()]
    lo, hi = shard_bounds(0, 3)
    ema = None
    for step in range(2):
        x, _ = batch(step)
        h = torch.sigmoid(x @ params[0].T + params[1])
        z = h[lo:hi] @ params[2].T + params[3]
        l2 = {"q": h.pow(2).sum(), "n": torch.tensor(float(h.shape[0] * h.shape[1]), dtype=torch.float64)}
        zl = {
            "z": torch.logsumexp(z, -1).pow(2).sum(),
            "n": torch.tensor(float(z.shape[0] * z.shape[1]), dtype=torch.float64),
        }
        if sync == "global":
            loss = 0.3 * l2["q"] / l2["n"] + 0.2 * zl["z"] / zl["n"]
        else:
            cur = {"l2q": l2["q"], "l2n": l2["n"], "z": zl["z"], "zn": zl["n"]}
            ema = (
                {k: (1 - DECAY) * v for k, v in cur.items()}
                if ema is None
                else {k: DECAY * ema[k].detach() + (1 - DECAY) * cur[k] for k in cur}
            )
            loss = 0.3 * ema["l2q"] / ema["l2n"] + 0.2 * ema["z"] / ema["zn"]
        grads = torch.autograd.grad(loss, params)
        for rank, result in enumerate(results):
            got = result["steps"][step]
            assert got["loss"] == pytest.approx(loss.item(), rel=1e-12)
            for g, r in zip(got["grads"], grads, strict=True):
                np.testing.assert_allclose(g, r.numpy(), rtol=1e-7, atol=1e-12, err_msg=f"rank {rank}")
        # the test model does not take an optimizer step, so parameters stay


@pytest.mark.parametrize("sync", ["global", "ema", "local"])
def test_zero_global_count_gives_zero_penalty_and_gradient(pools, sync):
    for result in pools[2].run(dist_cases.zero_count, NAMES, sync):
        for name in NAMES:
            assert result[name]["loss"] == 0.0, name
            for g in result[name]["grads"]:
                assert np.all(g == 0.0), name


def test_given_process_group(pools):
    results = pools[3].run(dist_cases.subgroup)
    assert results[1] is None
    params = [p.detach().clone().requires_grad_(True) for p in make_model().parameters()]
    x, _ = batch(0)
    h = torch.sigmoid(x @ params[0].T + params[1]).reshape(-1, 6)
    loss = 1.1 * torch.relu(0.6 - torch.sqrt(h.var(0) + 1e-4)).mean()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for rank in (0, 2):
        assert results[rank]["loss"] == pytest.approx(loss.item(), rel=1e-12)
        for g, r in zip(results[rank]["grads"], grads, strict=True):
            np.testing.assert_allclose(g, np.zeros_like(g) if r is None else r.numpy(), rtol=1e-7, atol=1e-12)


def test_custom_penalty_is_exact(pools):
    params = [p.detach().clone().requires_grad_(True) for p in make_model().parameters()]
    x, mask = batch(0)
    h = reference.activations(params, x, "1")[mask]
    loss = 2.0 * ((h.mean(0) - 0.3) ** 2).sum()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for result in pools[3].run(dist_cases.custom_penalty):
        assert result["loss"] == pytest.approx(loss.item(), rel=1e-12)
        for g, r in zip(result["grads"], grads, strict=True):
            np.testing.assert_allclose(g, np.zeros_like(g) if r is None else r.numpy(), rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("sync", ["global", "ema"])
def test_centred_moments_across_ranks(pools, sync):
    """|mean| >> std in float32: the first step's shift is agreed across ranks, later ones follow."""
    results = pools[3].run(dist_cases.large_mean, sync)
    batches = [dist_cases.large_mean_batch(step).float().double() for step in range(3)]
    for step, expected in enumerate(reference.moment_penalties(batches, sync)):
        for rank, metrics in enumerate(results):
            for key, value in expected.items():
                assert metrics[step][key] == pytest.approx(value, rel=2e-3), (rank, step, key)
