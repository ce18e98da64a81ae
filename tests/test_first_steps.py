"""First steps of centred slots and non-finite values (worker functions: dist_cases_first_steps.py).

- A centred slot (VarianceFloor, Covariance, DeCov) whose first step comes late -- an observed name
  first fed after the first ``loss()``, a module that did not run, a first step masked out on every
  rank -- takes that step around a shift agreed by all ranks: float32 rows at ``|mean|/std`` of
  1e3 and 1e4 give the float64 values and gradients.
- An inf or NaN in a centred slot's first step skips that step only: the next steps of every slot
  equal the float64 reference, in ``global``, ``ema`` and ``local`` mode, with ``"skip"`` and
  ``"raise"``.
- ``metrics()["skipped_steps"]`` counts every skipped step.
- An inf or NaN activation on one rank under DDP: no NaN in any parameter's gradient, for every
  built-in penalty, and the next finite step is exact.

The references are written here and in ``reference.py`` from the penalties' formulas, in float64,
on one process.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import actreg
import dist_cases_first_steps as cases
import reference
from problem import CASES, DECAY, HIDDEN, batch, shard_bounds

F64 = torch.float64
MOMENTS = ("h/VarianceFloor", "h/Covariance", "h/DeCov")
#: relative tolerance of the float32 runs against float64: values, and gradients relative to their
#: largest entry (measured: <= 2e-7 at 1e3 and 1e4; design.md promises 0.2 % at 1e3; the late
#: first step was 5.7 % off in value and 29x in gradient at 1e3, 1800x at 1e4)
RTOL = 2e-6


def _sums(h: Tensor, a: Tensor) -> dict[str, Tensor]:
    def count(t: Tensor) -> Tensor:
        return torch.tensor(float(t.shape[0]), dtype=F64)

    return {"n": count(h), "s": h.sum(0), "o": h.T @ h, "na": count(a), "a": a.abs().sum()}


def _values(s: dict[str, Tensor], nb: Tensor) -> dict[str, Tensor]:
    """VarianceFloor(1.0), Covariance(1.0), DeCov(1.0) of ``h`` and L1(0.7) of ``a``, from sums ``s``
    (Bessel sample size ``nb``), written from their formulas."""
    zero = s["s"].sum() * 0.0
    out = {"a/L1": 0.7 * s["a"] / s["na"] if float(s["na"]) > 0 else s["a"] * 0.0}
    n = s["n"]
    if float(n) == 0.0:
        return {**out, **{k: zero for k in MOMENTS}}
    mu = s["s"] / n
    biased = s["o"] / n - torch.outer(mu, mu)

    def off(c: Tensor) -> Tensor:
        return c.pow(2).sum() - torch.diagonal(c).pow(2).sum()

    out["h/DeCov"] = 0.5 * off(biased)
    if float(nb) <= 1.0:
        return {**out, "h/VarianceFloor": zero, "h/Covariance": zero}
    unbiased = biased * nb / (nb - 1)
    out["h/VarianceFloor"] = torch.relu(1.0 - torch.sqrt(torch.diagonal(unbiased) + 1e-4)).mean()
    out["h/Covariance"] = off(unbiased) / mu.numel()
    return out


def _reference(hs: list[Tensor], as_: list[Tensor], sync: str, skipped: frozenset[int] = frozenset()) -> list:
    """Per step: values and gradients w.r.t. the rows ``hs[t]`` and ``as_[t]`` (None for a skipped
    step: it leaves the moving average and its step count as they were)."""
    out: list[dict[str, object] | None] = []
    ema: dict[str, Tensor] | None = None
    committed = 0
    for t, (h0, a0) in enumerate(zip(hs, as_, strict=True)):
        if t in skipped:
            out.append(None)
            continue
        h, a = h0.clone().requires_grad_(True), a0.clone().requires_grad_(True)
        s = _sums(h, a)
        if sync == "ema":
            ema = reference.ema_update(ema, s, DECAY)
            committed += 1
            s = ema
            nb = ema["n"] / (1 - DECAY**committed)
        else:
            nb = s["n"]
        values = _values(s, nb)
        total = sum(values.values())
        gh, ga = torch.autograd.grad(total, [h, a], allow_unused=True)
        out.append(
            {
                "values": {k: v.item() for k, v in values.items()},
                "h": np.zeros(tuple(h.shape)) if gh is None else gh.numpy(),
                "a": ga.numpy(),
            }
        )
    return out


def _close_values(got: dict[str, float], expected: dict[str, float], where: object) -> None:
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=RTOL, abs=1e-12), (where, key, got[key], value)
    assert got["total"] == pytest.approx(sum(expected.values()), rel=RTOL, abs=1e-12), where


def _close_grads(got: np.ndarray, expected: np.ndarray, where: object) -> None:
    assert np.isfinite(got).all(), where
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * scale + 1e-12, err_msg=str(where))


LATE = [
    (world, sync, ratio, how)
    for world, sync in ((2, "global"), (2, "ema"))
    for how in ("observed", "module", "masked")
    for ratio in (1e3, 1e4)
] + [(3, "global", 1e4, "observed"), (3, "ema", 1e3, "masked"), (1, "global", 1e4, "masked")]


@pytest.mark.parametrize(("world", "sync", "ratio", "how"), LATE)
def test_late_first_step_of_a_centred_slot_is_exact(pools, world, sync, ratio, how):
    """A centred slot whose first step comes after the first ``loss()`` (or is masked out on every
    rank) takes it around the ranks' agreed mean: values and gradients of every slot equal the
    float64 reference at ``|mean|/std`` = 1e3 and 1e4, from that step on."""
    if world == 1:  # one process: no group
        results = [cases.late_first_step(0, 1, sync, ratio, how)]
    else:
        results = pools[world].run(cases.late_first_step, sync, ratio, how)
    hs = [cases.large_mean_batch(t, ratio) for t in range(3)]
    hs[0] = hs[0][:0]  # nothing kept at step 0
    expected = _reference(hs, [cases.light_batch(t) for t in range(3)], sync)
    for rank, steps in enumerate(results):
        rows = cases.shard(rank, world)
        for t, (got, ref) in enumerate(zip(steps, expected, strict=True)):
            where = (rank, t)
            _close_values(got["metrics"], ref["values"], where)
            _close_grads(got["a"] / world, ref["a"][rows], where)
            if t > 0:
                _close_grads(got["h"] / world, ref["h"][rows], where)
            else:
                assert not got["h"].any(), where


@pytest.mark.parametrize("sync", ["global", "ema", "local"])
@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_nonfinite_first_step_of_a_centred_slot_skips_that_step_only(pools, sync, policy):
    """inf (``skip``) or NaN (``raise``) in one value of rank 0's first step of a centred slot:
    that step is skipped (or raises at the next call) on the ranks that saw it, and every later
    step of every slot -- the L1 slot with finite data too -- equals the float64 reference."""
    bad = math.inf if policy == "skip" else math.nan
    world, ratio = 2, 1e3
    results = pools[world].run(cases.nonfinite_first_step, sync, policy, bad, ratio)
    hs = [cases.large_mean_batch(t, ratio) for t in range(3)]
    as_ = [cases.light_batch(t) for t in range(3)]
    for rank, steps in enumerate(results):
        rows = cases.shard(rank, world)
        g = 1.0 if sync == "local" else float(world)
        failed = rank == 0 or sync != "local"  # in local mode only rank 0's own step fails
        if sync == "local":
            own = ([h[rows] for h in hs], [a[rows] for a in as_])
            expected = _reference(*own, sync, frozenset({0} if failed else ()))
            rows = slice(None)
        else:
            expected = _reference(hs, as_, sync, frozenset({0}))
        for t, (got, ref) in enumerate(zip(steps, expected, strict=True)):
            where = (rank, t)
            if ref is None:  # the failed step: zero penalty and gradient, reported per the policy
                assert (got["raised"] is not None) == (policy == "raise"), where
                assert got["metrics"]["total"] == 0.0 and not got["a"].any() and not got["h"].any(), where
                continue
            assert got["raised"] is None, (where, got["raised"])
            _close_values(got["metrics"], ref["values"], where)
            _close_grads(got["a"] / g, ref["a"][rows], where)
            _close_grads(got["h"] / g, ref["h"][rows], where)
        if policy == "skip":
            assert steps[-1]["metrics"]["skipped_steps"] == (1.0 if failed else 0.0), rank


def test_skipped_steps_counts_every_skipped_step():
    """``metrics()["skipped_steps"]`` is the number of skipped steps (it stopped at 1.0)."""
    reg = actreg.ActivityRegularizer(nn.Identity(), {"h": actreg.L1(1.0)}, observed=["h"], nonfinite="skip")
    values = [math.inf, 1.0, math.nan, math.inf, 2.0, -math.inf]
    for step, value in enumerate(values):
        reg.observe("h", torch.full((3, 2), value))
        reg.loss()
        skipped = sum(not math.isfinite(v) for v in values[: step + 1])
        assert reg.metrics()["skipped_steps"] == float(skipped), step
    assert reg.metrics()["skipped_steps"] == 4.0


def _activations(params: list[Tensor], x: Tensor) -> Tensor:
    weight, bias = params
    return x @ weight.T + bias


#: (sync, bad value, width): at width 40 the Gram penalties exchange rows (W * rows * d < d * d)
NONFINITE = [
    ("global", math.inf, HIDDEN),
    ("global", math.nan, HIDDEN),
    ("ema", math.inf, HIDDEN),
    ("local", math.nan, HIDDEN),
    ("global", math.inf, 40),
    ("ema", math.nan, 40),
]
WIDE = ["L2", "DeCov", "VarianceFloor", "Covariance"]


@pytest.mark.parametrize(("sync", "bad", "width"), NONFINITE)
def test_nonfinite_activation_on_one_rank_gives_no_nan_gradient(pools, sync, bad, width):
    """DDP, W = 2: rank 0's activation is inf or NaN on one feature. Every penalty's step is
    skipped with zero gradient on every rank -- no NaN reaches a parameter -- and the next, finite
    step equals the float64 reference (``ema``: the skipped step left the average untouched).
    Every built-in penalty; at width 40, those of wide layers, whose Gram travels as rows."""
    names = list(CASES) if width == HIDDEN else WIDE
    world = 2
    results = pools[world].run(cases.nonfinite_activation, names, sync, bad, width)
    for name in names:
        model = cases.make_injected(name, width)
        params = [p.detach().clone().requires_grad_(True) for p in model[0].parameters()]
        x, mask = batch(1)
        act = _activations(params, x)
        if sync == "global":
            per_rank = [reference.direct(name, act, mask)] * world
        elif sync == "local":
            bounds = [shard_bounds(rank, world) for rank in range(world)]
            per_rank = [reference.direct(name, act[a:b], mask[a:b]) for a, b in bounds]
        else:
            ema = reference.ema_update(None, reference.sums(name, act, mask), DECAY)
            per_rank = [reference.value_of(name, ema, ema["n"] / (1 - DECAY))] * world
        loss = sum(per_rank) / world  # what DDP's averaged gradients descend
        grads = torch.autograd.grad(loss, params)
        skipped = [torch.zeros_like(p) for p in params]  # every rank's step 0 failed: zero gradient
        if sync == "local":  # rank 0's own step failed; rank 1's counts (averaged over 2 ranks)
            x0, mask0 = batch(0)
            a, b = shard_bounds(1, world)
            own = reference.direct(name, _activations(params, x0)[a:b], mask0[a:b]) / world
            skipped = list(torch.autograd.grad(own, params))
        for rank, per_name in enumerate(results):
            first, second = per_name[name]
            for g, r in zip(first["grads"], skipped, strict=True):
                assert not np.isnan(g).any(), (name, rank, "NaN gradient")
                np.testing.assert_allclose(g, r.numpy(), rtol=1e-7, atol=1e-12, err_msg=f"{name} rank {rank}")
            assert second["loss"] == pytest.approx(per_rank[rank].item(), rel=1e-9), (name, rank)
            for g, r in zip(second["grads"], grads, strict=True):
                np.testing.assert_allclose(g, r.numpy(), rtol=1e-7, atol=1e-12, err_msg=f"{name} rank {rank}")
