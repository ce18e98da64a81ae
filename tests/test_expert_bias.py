"""Aux-loss-free balancing from exact global counts: ``ExpertBias`` (issue 13, item 3).

The reference is float64, single process, on the global tokens of each micro-batch, written from the
published update rules -- DeepSeek-V3 §2.1.2 (``b_i += γ sign(mean load - load_i)`` once per step,
on the load of the whole batch) and torchtitan's mean-centred variant (the same step minus its mean
over experts) -- with a loop over steps and ``(top == e).sum()`` counts, not through actreg.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import actreg
import dist_cases_expert_bias as cases
from dist_cases_expert_bias import CASES, EXPERTS, MICRO, RATE, STEPS, batch, make_router

ATOL = 1e-6  # the library keeps the bias in float32 (DeepSeek-V3 does too); steps are ±0.05
LB_WEIGHT = 0.5


def _setting(name: str) -> tuple[int, str, str, bool]:
    """(top_k, update, score, has LoadBalance) of case ``name``, read from its source."""
    ps = cases.make_penalties(name)
    bias = next(p for p in ps if isinstance(p, actreg.ExpertBias))
    return bias.top_k, bias.update, bias.score, any(isinstance(p, actreg.LoadBalance) for p in ps)


def _scores(x: Tensor, score: str) -> Tensor:
    return torch.softmax(x, -1) if score == "softmax" else torch.sigmoid(x)


def _probabilities(x: Tensor, score: str) -> Tensor:
    if score == "softmax":
        return torch.softmax(x, -1)
    s = torch.sigmoid(x)
    return s / s.sum(-1, keepdim=True)


@functools.cache
def expected(name: str) -> dict[str, list]:
    """Float64 reference of case ``name``: bias after every step, LoadBalance per micro-batch,
    MaxVio / dead experts of the last micro-batch of each step, the final routing, and whether the
    bias changed any token's choice."""
    k, update, score, has_lb = _setting(name)
    router = make_router()
    b = torch.zeros(EXPERTS, dtype=torch.float64)
    out: dict[str, list] = {"bias": [], "loss": [], "metrics": [], "changed": []}
    with torch.no_grad():
        for step in range(STEPS):
            window = torch.zeros(EXPERTS, dtype=torch.float64)
            for micro in range(MICRO):
                x, mask = batch(step, micro)
                logits = router(x)[mask]  # the kept tokens of the global micro-batch
                top = torch.topk(_scores(logits, score) + b, k, -1).indices
                plain = torch.topk(logits, k, -1).indices
                out["changed"].append(bool((top.sort(-1).values != plain.sort(-1).values).any()))
                load = torch.stack([(top == e).sum() for e in range(EXPERTS)]).double()
                window += load
                if has_lb:
                    n = logits.shape[0]
                    f = load / (n * k)
                    p = _probabilities(logits, score).mean(0)
                    out["loss"].append(float(LB_WEIGHT * EXPERTS * (f * p).sum()))
                else:
                    out["loss"].append(0.0)
            mean = load.mean()
            out["metrics"].append(
                {
                    "router/max_violation": float(load.max() / mean - 1),
                    "router/dead_experts": float((load == 0).sum()),
                }
            )
            delta = RATE * torch.sign(window.mean() - window)
            if update == "centred":
                delta = delta - delta.mean()
            b = b + delta
            out["bias"].append(b.numpy().copy())
        x, _ = batch(STEPS - 1, MICRO - 1)
        out["routed"] = [torch.topk(_scores(router(x), score) + b, k, -1).indices.numpy()]
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_bias_follows_the_window_counts_of_every_rank(pools, world_size: int) -> None:
    """W = 1, 2, 3 with uneven and empty shards, 2 micro-batches (two ``loss()``) per optimizer
    step: the bias after every step is the float64 reference on the global tokens, for the sign and
    the centred update, triggered by ``update_bias()`` and by ``attach(optimizer)``, with and without
    non-reentrant activation checkpointing (recomputed tokens are not counted twice); identical on
    every rank; the LoadBalance of the slot records the biased choice; metrics; the model's routing;
    one all_reduce per ``loss()`` and none in the update; ``state_dict`` round trip."""
    names = list(CASES)
    ranks = pools[world_size].run(cases.train, names)
    for name in names:
        ref = expected(name)
        assert any(ref["changed"]), f"{name}: the bias never changed a choice, the test would be void"
        for r in ranks:
            got = r[name]
            np.testing.assert_allclose(
                np.stack(got["bias"]), np.stack(ref["bias"]), rtol=0, atol=ATOL, err_msg=name
            )
            np.testing.assert_array_equal(np.stack(got["bias"]), np.stack(ranks[0][name]["bias"]))
            np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-6, atol=1e-9, err_msg=name)
            for m, e in zip(got["metrics"], ref["metrics"], strict=True):
                assert m == pytest.approx(e, rel=1e-9, abs=1e-12), name
            np.testing.assert_array_equal(got["routed"], ref["routed"][0])
            communicates = world_size > 1
            for i, ops in enumerate(got["collectives"]):
                if i == 0:  # the first loss() also agrees on the layout (all_gather_object)
                    ops = [o for o in ops if o != "c10d::allgather_"]
                is_update = i % (MICRO + 1) == MICRO
                wanted = [] if is_update or not communicates else ["c10d::allreduce_"]
                assert ops == wanted, (name, i, ops)
            np.testing.assert_array_equal(got["state_bias"], got["bias"][-1])
            np.testing.assert_array_equal(got["loaded_bias"], got["bias"][-1])
            assert got["fresh_bias_was_zero"]


def _observed(
    penalties: list[actreg.Penalty], names: tuple[str, ...] = ("router",)
) -> actreg.ActivityRegularizer:
    return actreg.ActivityRegularizer(nn.Linear(2, 2), {n: penalties for n in names}, observed=list(names))


def test_routing_changes_with_the_bias_and_matches_what_is_recorded() -> None:
    """``reg.route`` is ``topk(scores + b)``; a bias moves the choice, the recorded counts follow it."""
    reg = _observed([actreg.ExpertBias(4, 1, rate=1.0), actreg.LoadBalance(4, 1, 1.0)])
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [1.5, 1.4, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0]])
    assert reg.route("router", logits)[:, 0].tolist() == [0, 0, 1]
    state = reg.state_dict()
    state["expert_bias"]["router"] = torch.tensor([-1.0, 0.0, 0.0, 0.0])
    reg.load_state_dict(state)
    assert reg.route("router", logits)[:, 0].tolist() == [1, 1, 1]
    reg.observe("router", logits)
    reg.loss()
    m = reg.metrics()
    assert m["router/dead_experts"] == 3.0
    assert m["router/max_violation"] == pytest.approx(4 * 3 / 3 - 1)
    reg.update_bias()  # loads [0, 3, 0, 0]: mean 0.75, b -= 1 for expert 1, += 1 for the others
    assert reg.expert_bias("router").tolist() == [0.0, -1.0, 1.0, 1.0]


def test_each_router_of_a_glob_keeps_its_own_bias_and_no_tokens_move_nothing() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4))
    reg = actreg.ActivityRegularizer(model, {"*": actreg.ExpertBias(4, 1, rate=0.5)})
    reg.update_bias()  # before any loss(): an empty window
    model(torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.1, -1.0]]))
    reg.loss()
    reg.update_bias()
    first, second = reg.expert_bias("0"), reg.expert_bias("1")
    assert first.data_ptr() != second.data_ptr()
    assert set(first.abs().tolist()) == {0.5} and set(second.abs().tolist()) == {0.5}
    assert reg.state_dict()["expert_bias"].keys() == {"0", "1"}
    before = first.clone()
    reg.update_bias()  # a new window with nothing in it: sign(0) = 0
    assert torch.equal(reg.expert_bias("0"), before)


def test_repr_and_parameters() -> None:
    assert repr(actreg.ExpertBias(8, 2)) == "ExpertBias(num_experts=8, rate=0.001, top_k=2)"
    assert repr(actreg.ExpertBias(8, 2, 0.01, "centred", "sigmoid")) == (
        "ExpertBias(num_experts=8, rate=0.01, score='sigmoid', top_k=2, update='centred')"
    )
    with pytest.raises(ValueError, match="update must be one of"):
        actreg.ExpertBias(8, 2, update="mean")
    with pytest.raises(ValueError, match="rate"):
        actreg.ExpertBias(8, 2, rate=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        actreg.ExpertBias(2, 3)


def test_misuse_is_refused_with_what_to_do() -> None:
    with pytest.raises(ValueError, match="route differently"):
        _observed([actreg.ExpertBias(4, 2), actreg.LoadBalance(4, 1, 1.0)])
    with pytest.raises(ValueError, match="one ExpertBias per router"):
        _observed([actreg.ExpertBias(4, 2), actreg.ExpertBias(4, 2)])
    plain = _observed([actreg.LoadBalance(4, 1, 1.0)])
    with pytest.raises(ValueError, match="no ExpertBias is registered"):
        plain.update_bias()
    with pytest.raises(ValueError, match="no ExpertBias is registered"):
        plain.expert_bias("router")
    with pytest.raises(ValueError, match="no ExpertBias"):
        plain.attach(torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1))
    reg = _observed([actreg.ExpertBias(4, 1, rate=0.1)])
    opt = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)
    handle = reg.attach(opt)
    with pytest.raises(ValueError, match="already attached"):
        reg.attach(opt)
    with pytest.raises(RuntimeError, match="twice"):
        reg.update_bias()
    reg.observe("router", torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    reg.loss()
    opt.step()  # the hook moves the bias
    assert reg.expert_bias("router").tolist() == pytest.approx([-0.1, 0.1, 0.1, 0.1])
    handle.remove()
    reg.observe("router", torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    with pytest.warns(RuntimeWarning, match="before optimizer.step"):
        reg.update_bias()  # the records wait for loss(): counted in the next window


def test_state_dict_is_validated_before_anything_is_applied() -> None:
    reg = _observed([actreg.ExpertBias(4, 1, rate=0.1)])
    reg.observe("router", torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    reg.loss()
    reg.update_bias()
    kept = reg.expert_bias("router").clone()
    good = reg.state_dict()
    bad_cases = [
        ({"router": torch.zeros(3)}, ValueError, "expected \\[4\\]"),
        ({"router": torch.tensor([0.0, float("nan"), 0.0, 0.0])}, ValueError, "non-finite"),
        ({}, ValueError, "missing the biases"),
        ({"router": torch.zeros(4), "other": torch.zeros(4)}, ValueError, "no ExpertBias"),
        ({"router": torch.zeros(4, dtype=torch.long)}, TypeError, "floating"),
        ([1, 2], TypeError, "mapping"),
    ]
    for value, error, match in bad_cases:
        with pytest.raises(error, match=match):
            reg.load_state_dict({**good, "expert_bias": value})
        assert torch.equal(reg.expert_bias("router"), kept)
    old = {k: v for k, v in good.items() if k != "expert_bias"}  # a state saved before ExpertBias
    reg.load_state_dict(old)
    assert torch.equal(reg.expert_bias("router"), kept)
