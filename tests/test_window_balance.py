"""``LoadBalance(counts="window")``: the window buffer under gradient accumulation (issue 13, item 4).

Three semantics of a load-balancing loss under ``k`` micro-batches per optimizer step, each against
its own float64 formula on the global tokens (every rank's shard), written here from the papers,
not through actreg -- ``f_e = (top-k assignments to e) / (n k)``, ``P_e = mean_i p_ie``,
``value = w E sum_e f_e P_e``:

- **window buffer** (Qwen's Algorithm 1 with a buffer, Megatron's ``global_aux_loss``): in the
  ``m``-th micro-batch, ``f`` from the counts of micro-batches ``1..m`` of the window, ``P`` from
  micro-batch ``m``; the window restarts at each optimizer step;
- **per micro-batch** (the default ``LoadBalance``, ``reg.loss()`` in every micro-batch): ``f`` and
  ``P`` of micro-batch ``m``;
- **exact window with kept graphs** (``reg.loss()`` once, in the last micro-batch): ``f`` and ``P``
  of the whole window.

The accumulated gradient is the sum of the gradients of every ``reg.loss()`` of the window (as if
one process held every rank's tokens), after DDP's averaging.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import actreg
import dist_cases_window as cases
from dist_cases_window import CASES, EXPERTS, LR, MICROS, Net, batch


def _probabilities(x: torch.Tensor, score: str) -> torch.Tensor:
    if score == "softmax":
        return torch.softmax(x, -1)
    s = torch.sigmoid(x)
    return s / s.sum(-1, keepdim=True)


def _load(logits: torch.Tensor, k: int) -> torch.Tensor:
    top = torch.topk(logits.detach(), k, -1).indices
    return torch.stack([(top == e).sum() for e in range(EXPERTS)]).double()


@functools.cache
def expected(name: str) -> dict[str, list]:
    """Float64 reference of case ``name``: the penalty of every ``loss()`` and the router's
    accumulated gradient at every optimizer step (SGD moves the router between steps)."""
    p = cases.make_penalty(name)
    _, recipe, _, _ = CASES[name]
    k, w, score = p.top_k, p.weight, p.score
    router = Net(False).router
    weight = router.weight.detach().clone().requires_grad_(True)
    bias = router.bias.detach().clone().requires_grad_(True)
    out: dict[str, list] = {"loss": [], "grad": []}
    for step, micros in enumerate(MICROS):
        gw, gb = torch.zeros_like(weight), torch.zeros_like(bias)
        window_load = torch.zeros(EXPERTS, dtype=torch.float64)
        window_tokens = 0
        kept = []
        for micro in range(micros):
            x, mask = batch(step, micro)
            logits = (x @ weight.T + bias)[mask]  # the kept tokens of the global micro-batch
            n = logits.shape[0]
            load = _load(logits, k)
            window_load += load
            window_tokens += n
            kept.append(logits)
            if recipe == "micro":
                if p.counts == "window":
                    f = window_load / (window_tokens * k)  # the window's counts so far
                else:
                    f = load / (n * k)  # this micro-batch's
                value = w * EXPERTS * (f * _probabilities(logits, score).mean(0)).sum()
            elif micro == micros - 1:  # "kept": once, over the whole window
                every = torch.cat(kept)
                f = _load(every, k) / (every.shape[0] * k)
                value = w * EXPERTS * (f * _probabilities(every, score).mean(0)).sum()
            else:
                continue
            a, b = torch.autograd.grad(value, (weight, bias))
            gw, gb = gw + a, gb + b
            out["loss"].append(float(value.detach()))
        out["grad"].append([gw.numpy().copy(), gb.numpy().copy()])
        with torch.no_grad():
            weight -= LR * gw
            bias -= LR * gb
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_window_counts_values_and_ddp_gradients(pools, world_size: int) -> None:
    """W = 1, 2, 3 with uneven and empty shards, 3, 2, 3 micro-batches per optimizer step under
    ``ddp.no_sync()``: every ``loss()`` and the DDP-averaged gradient of every optimizer step equal
    the float64 reference of each semantics -- window buffer (softmax, sigmoid, top-1; closed by
    ``update_bias()`` and by ``attach(optimizer)``), the default per micro-batch, and the exact window
    with kept graphs -- also under non-reentrant activation checkpointing (recomputed tokens counted
    once); ``metrics()`` reports the same value; one all_reduce per ``loss()``, none at the step."""
    names = list(CASES)
    ranks = pools[world_size].run(cases.train, names)
    for name in names:
        ref = expected(name)
        for r in ranks:
            got = r[name]
            np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-10, atol=1e-12, err_msg=name)
            np.testing.assert_allclose(got["metric"], ref["loss"], rtol=1e-10, atol=1e-12, err_msg=name)
            for g, e in zip(got["grad"], ref["grad"], strict=True):
                for a, b in zip(g, e, strict=True):
                    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12, err_msg=name)
            one = ["c10d::allreduce_"] if world_size > 1 else []
            per_step = [m if CASES[name][1] == "micro" else 1 for m in MICROS]
            wanted = [ops for m in per_step for ops in [*[one] * m, []]]  # loss() calls, then the step
            calls = list(got["collectives"])
            calls[0] = [o for o in calls[0] if o != "c10d::allgather_"]  # first loss(): layout agreed
            assert calls == wanted, name


def expected_local(name: str, world_size: int) -> dict[str, list]:
    """Float64 reference of ``sync="local"``: every rank's own window (its shard's counts of the
    micro-batches so far, ``P`` of its current micro-batch; a micro-batch without kept tokens has
    value 0), the router's gradient the mean over ranks of their accumulated gradients (DDP)."""
    p = cases.make_penalty(name)
    k, w, score = p.top_k, p.weight, p.score
    router = Net(False).router
    weight = router.weight.detach().clone().requires_grad_(True)
    bias = router.bias.detach().clone().requires_grad_(True)
    out: dict[str, list] = {"loss": [[] for _ in range(world_size)], "grad": []}
    for step, micros in enumerate(MICROS):
        gw, gb = torch.zeros_like(weight), torch.zeros_like(bias)
        for rank in range(world_size):
            window_load = torch.zeros(EXPERTS, dtype=torch.float64)
            window_tokens = 0
            for micro in range(micros):
                x, mask = batch(step, micro)
                start, stop = cases.bounds(rank, world_size, micro)
                logits = (x[start:stop] @ weight.T + bias)[mask[start:stop]]
                n = logits.shape[0]
                window_load += _load(logits, k)
                window_tokens += n
                if n == 0:
                    out["loss"][rank].append(0.0)
                    continue
                f = window_load / (window_tokens * k)
                value = w * EXPERTS * (f * _probabilities(logits, score).mean(0)).sum()
                a, b = torch.autograd.grad(value, (weight, bias))
                gw, gb = gw + a / world_size, gb + b / world_size
                out["loss"][rank].append(float(value.detach()))
        out["grad"].append([gw.numpy().copy(), gb.numpy().copy()])
        with torch.no_grad():
            weight -= LR * gw
            bias -= LR * gb
    return out


@pytest.mark.parametrize("world_size", [2, 3])
def test_local_window_is_each_ranks_own(pools, world_size: int) -> None:
    """``sync="local"``: each rank's window of its own counts (uneven and empty shards), no
    collective in any ``loss()``; DDP averages the ranks' gradients."""
    names = ["window_softmax", "window_sigmoid_checkpointed"]
    ranks = pools[world_size].run(cases.train, names, "local")
    for name in names:
        ref = expected_local(name, world_size)
        assert not np.allclose(ref["loss"][0], expected(name)["loss"])  # not the global window
        for rank, r in enumerate(ranks):
            got = r[name]
            np.testing.assert_allclose(got["loss"], ref["loss"][rank], rtol=1e-10, atol=1e-12, err_msg=name)
            for g, e in zip(got["grad"], ref["grad"], strict=True):
                for a, b in zip(g, e, strict=True):
                    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12, err_msg=name)
            assert all(c == [] for c in got["collectives"][1:]), got["collectives"]


def test_window_with_ema_is_refused() -> None:
    with pytest.raises(ValueError, match=r"counts='window'\) with sync='ema'"):
        actreg.ActivityRegularizer(
            torch.nn.Module(), {"router": actreg.LoadBalance(4, 2, 0.5, counts="window")},
            observed=["router"], sync="ema",
        )


def test_window_differs_from_per_micro_batch() -> None:
    """The semantics are distinct on this problem (else the test above would prove nothing)."""
    window, micro = expected("window_softmax"), expected("batch_per_micro")
    assert not np.allclose(window["loss"], micro["loss"])
    # the first micro-batch: f of a one-micro-batch window is its own (later, the routers differ)
    assert window["loss"][0] == pytest.approx(micro["loss"][0], rel=1e-12)


def test_default_repr_and_parameters_are_unchanged() -> None:
    assert repr(actreg.LoadBalance(4, 2, 0.5)) == "LoadBalance(num_experts=4, top_k=2, weight=0.5)"
    assert actreg.LoadBalance(4, 2, 0.5).counts == "batch"
    assert (
        actreg.LoadBalance(4, 2, 0.5, counts="batch").hyperparameters()
        == actreg.LoadBalance(4, 2, 0.5).hyperparameters()
    )
    windowed = actreg.LoadBalance(4, 2, 0.5, counts="window")
    assert repr(windowed) == "LoadBalance(counts='window', num_experts=4, top_k=2, weight=0.5)"
    with pytest.raises(ValueError, match="counts must be one of"):
        actreg.LoadBalance(4, 2, 0.5, counts="global")


def _observed(penalty: actreg.Penalty) -> actreg.ActivityRegularizer:
    return actreg.ActivityRegularizer(torch.nn.Linear(2, 2), {"router": [penalty]}, observed=["router"])


def test_the_window_closes_at_update_and_only_where_one_exists() -> None:
    """Single process: closing restarts ``f`` from the next micro-batch; ``update_bias`` and
    ``attach`` refuse a regularizer with nothing to close; a forgotten close warns."""
    torch.manual_seed(0)
    reg = _observed(actreg.LoadBalance(4, 2, 1.0, counts="window"))
    plain = _observed(actreg.LoadBalance(4, 2, 1.0))
    xs = [torch.randn(6, 4, dtype=torch.float64) for _ in range(3)]
    for i, x in enumerate(xs):
        if i == 2:
            reg.update_bias()  # a new window: the third loss() is the plain one again
        reg.observe("router", x)
        plain.observe("router", x)
        a, b = reg.loss(), plain.loss()
        assert (float(a) == pytest.approx(float(b), rel=1e-12)) == (i != 1), i
    with pytest.raises(ValueError, match="no window to close"):
        plain.update_bias()
    with pytest.raises(ValueError, match="nothing to update"):
        plain.attach(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
    with pytest.warns(RuntimeWarning, match="without closing the window"):
        for _ in range(cases_forgotten()):
            reg.observe("router", xs[0])
            reg.loss()


def cases_forgotten() -> int:
    from actreg.window import FORGOTTEN_AFTER

    return FORGOTTEN_AFTER


def _window_value(xs: list[torch.Tensor], k: int) -> float:
    """Float64: ``E sum_e f_e P_e``, ``f`` from every logits of ``xs``, ``P`` from the last."""
    every = torch.cat(xs)
    f = _load(every, k) / (every.shape[0] * k)
    return float(EXPERTS * (f * torch.softmax(xs[-1], -1).mean(0)).sum())


def test_a_slot_that_first_runs_mid_window_joins_it_and_the_others_keep_their_counts() -> None:
    torch.manual_seed(1)
    window = {  # "b" first: when it gets its place, "a"'s counts move in the step buffer
        "b": [actreg.LoadBalance(4, 1, 1.0, counts="window")],
        "a": [actreg.LoadBalance(4, 2, 1.0, counts="window")],
    }
    reg = actreg.ActivityRegularizer(torch.nn.Linear(2, 2), window, observed=["b", "a"])
    assert reg.slot_names == ["b", "a"]
    xa = [torch.randn(5, 4, dtype=torch.float64) for _ in range(3)]
    xb = [torch.randn(7, 4, dtype=torch.float64) for _ in range(3)]
    for m in range(3):
        reg.observe("a", xa[m])
        if m > 0:  # "b" runs from the second micro-batch on: the layout changes mid-window
            reg.observe("b", xb[m])
        reg.loss()
        got = reg.metrics()
        assert got["a/LoadBalance"] == pytest.approx(_window_value(xa[: m + 1], 2), rel=1e-12), m
        if m > 0:
            assert got["b/LoadBalance"] == pytest.approx(_window_value(xb[1 : m + 1], 1), rel=1e-12), m
