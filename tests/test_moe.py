"""Router balance penalties: ``LoadBalance(score="sigmoid")`` and ``SequenceBalance`` (issue 13, items 1, 2).

References are float64, single process, on the whole batch, written from the published formulas
(DeepSeek-V3 §2.1.2 eqs. 17-20 for the sequence-wise loss; Switch eq. 4 for the pooled one) with
boolean indexing and a loop over sequences -- not through actreg's statistics.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import actreg
import dist_cases_moe as cases
from dist_cases_moe import CASES, EXPERTS, LR, STEPS, TOP_K, batch, make_router

RTOL = 1e-7
ATOL = 1e-12
WEIGHT = 0.8  # the weight of every case of CASES


def scores(x: Tensor, kind: str) -> Tensor:
    """``p_ie``: softmax, or DeepSeek-V3's sigmoid scores normalised over the experts of the token."""
    if kind == "softmax":
        return torch.softmax(x, dim=-1)
    s = torch.sigmoid(x)
    return s / s.sum(-1, keepdim=True)


def balance(x: Tensor, kind: str, k: int = TOP_K) -> Tensor:
    """``E * sum_e f_e P_e`` of the tokens ``x`` ``[n, E]``: ``f_e`` the share of the ``n * k``
    top-k choices (on the scores) that go to ``e``, ``P_e`` the mean score of ``e``."""
    e = x.shape[-1]
    p = scores(x, kind)
    top = torch.topk(p, k, dim=-1).indices
    f = torch.stack([(top == j).sum() for j in range(e)]).to(x.dtype) / (x.shape[0] * k)
    return e * (f * p.mean(0)).sum()


def sequence_balance(logits: Tensor, mask: Tensor, kind: str) -> Tensor:
    """Mean over the sequences with a kept token of each one's ``balance`` (``logits`` [S, T, E])."""
    terms = [balance(logits[s][mask[s]], kind) for s in range(len(logits)) if mask[s].any()]
    return torch.stack(terms).mean()


def penalty_of(name: str, logits: Tensor, mask: Tensor) -> Tensor:
    kind = "sigmoid" if "sigmoid" in CASES[name] else "softmax"
    if name.startswith("seq"):
        return WEIGHT * sequence_balance(logits, mask, kind)
    return WEIGHT * balance(logits[mask], kind)


@functools.cache
def expected(name: str) -> dict[str, list]:
    """Plain SGD on one process over the whole batch, the penalty as the only loss."""
    return sgd_on_whole_batch(functools.partial(penalty_of, name))


def sgd_on_whole_batch(penalty: Callable[[Tensor, Tensor], Tensor]) -> dict[str, list]:
    """Per step of plain SGD on the router over the whole batch, ``penalty(logits, mask)`` the only
    loss: its value and its gradients."""
    router = make_router()
    losses, grads = [], []
    for step in range(STEPS):
        x, mask = batch(step)
        loss = penalty(router(x), mask)
        g = torch.autograd.grad(loss, list(router.parameters()))
        with torch.no_grad():
            for p, gp in zip(router.parameters(), g, strict=True):
                p -= LR * gp
        losses.append(loss.item())
        grads.append([t.numpy().copy() for t in g])
    return {"loss": losses, "grads": grads}


def _compare(ranks: list, names: list[str], where: str) -> None:
    for name in names:
        ref = expected(name)
        assert any(np.abs(g).max() > 1e-3 for g in ref["grads"][0]), f"{name}: reference gradient ~0"
        for got in ranks:
            at = f"{name} {where} rank {got['rank']}"
            np.testing.assert_allclose(got[name]["loss"], ref["loss"], rtol=RTOL, atol=ATOL, err_msg=at)
            if len(ranks) > 1:  # after the first step's agreement: the step's one all_reduce, nothing else
                assert got[name]["collectives"][1:] == [["c10d::allreduce_"]] * (STEPS - 1), (at, got[name])
            for step in range(STEPS):
                for i, (g, r) in enumerate(zip(got[name]["grads"][step], ref["grads"][step], strict=True)):
                    np.testing.assert_allclose(
                        g, r, rtol=RTOL, atol=ATOL, err_msg=f"{at} step {step} param {i}"
                    )


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_data_parallel_matches_whole_batch(pools, world_size: int) -> None:
    """W = 1, 2, 3 (sequences 6 | 4 + 2 | 3 + 0 + 3, a padding mask): sequence-wise balance with
    both scores and the pooled sigmoid balance equal float64 on the whole batch, value and
    DDP-averaged gradients, over 2 SGD steps."""
    ranks = pools[world_size].run(cases.data_parallel, list(CASES))
    _compare(ranks, list(CASES), f"W={world_size}")


def test_data_by_context_parallel_sums_each_sequence_over_its_ranks(pools) -> None:
    """4 ranks as DP 2 x CP 2, every sequence split 3 + 2 tokens over its context-parallel pair (one
    sequence has no kept token on the second): each sequence's statistics are summed over the ranks
    holding it before its product, so value and gradients equal float64 on the whole batch."""
    ranks = pools[4].run(cases.data_context_parallel, list(CASES), timeout=240.0)
    assert sorted((r["dp"], r["cp"]) for r in ranks) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    _compare(ranks, list(CASES), "DP 2 x CP 2")
    # the per-rank formula (each rank's own sequence slices) is not that: the test can fail
    x, mask = batch(0)
    router = make_router()
    halves = [(slice(0, cases.CP_SPLIT)), slice(cases.CP_SPLIT, None)]
    local = [penalty_of("seq_softmax", router(x[:4, t]), mask[:4, t]).item() for t in halves]
    assert not np.allclose(local, expected("seq_softmax")["loss"][0], rtol=1e-3)


@pytest.mark.parametrize("score", ["", "-sigmoid"])
def test_sequence_balance_costs_at_most_twice_load_balance_per_router(score: str) -> None:
    """Issue 13's budget: top-level aten ops per router per step (benchmarks/op_count.py, forward,
    loss and backward) of the sequence-wise term at most 2x those of the pooled one."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import op_count

    pooled = op_count.fit_details(f"LoadBalance{score}", width=64)
    per_sequence = op_count.fit_details(f"SequenceBalance{score}", width=64)
    assert per_sequence.per_layer["total"] <= 2 * pooled.per_layer["total"], op_count.table(
        [pooled, per_sequence]
    )
    assert per_sequence.infrastructure == pooled.infrastructure  # nothing more per step but values


# ---------------------------------------------------------------------- one process


def _observed(penalty: actreg.Penalty, **kw: object) -> actreg.ActivityRegularizer:
    return actreg.ActivityRegularizer(nn.Module(), {"router": penalty}, observed=["router"], **kw)  # type: ignore[arg-type]


def test_score_default_keeps_repr_and_sigmoid_is_named() -> None:
    """The default score is left out of the repr (compared across ranks, in logs): unchanged."""
    assert repr(actreg.LoadBalance(4, 2, 0.9)) == "LoadBalance(num_experts=4, top_k=2, weight=0.9)"
    assert repr(actreg.LoadBalance(4, 2, 0.9, score="softmax")) == repr(actreg.LoadBalance(4, 2, 0.9))
    assert repr(actreg.LoadBalance(4, 2, 0.9, score="sigmoid")) == (
        "LoadBalance(num_experts=4, score='sigmoid', top_k=2, weight=0.9)"
    )
    assert repr(actreg.SequenceBalance(4, 2, 0.9, 8)) == (
        "SequenceBalance(num_experts=4, num_sequences=8, top_k=2, weight=0.9)"
    )
    for make in (
        lambda s: actreg.LoadBalance(4, 2, 1.0, score=s),
        lambda s: actreg.SequenceBalance(4, 2, 1.0, 3, s),
    ):
        with pytest.raises(ValueError, match=r"score must be one of \['softmax', 'sigmoid'\].*'tanh'"):
            make("tanh")
    with pytest.raises(ValueError, match="num_sequences must be an integer >= 1, got 0"):
        actreg.SequenceBalance(4, 2, 1.0, 0)
    with pytest.raises(ValueError, match="top_k must be an integer in"):
        actreg.SequenceBalance(4, 5, 1.0, 2)


def test_softmax_and_sigmoid_routers_in_one_step_are_separate_groups() -> None:
    """Several routers with both scores (batched evaluation groups alike penalties): each its formula."""
    g = torch.Generator().manual_seed(7)
    logits = {
        n: torch.randn(9, EXPERTS, generator=g, dtype=torch.float64, requires_grad=True) for n in "abcd"
    }
    kinds = {"a": "softmax", "b": "sigmoid", "c": "sigmoid", "d": "softmax"}
    reg = actreg.ActivityRegularizer(
        nn.Module(),
        {n: actreg.LoadBalance(EXPERTS, TOP_K, 0.3 + i, score=kinds[n]) for i, n in enumerate("abcd")},
        observed=list("abcd"),
    )
    for n, t in logits.items():
        reg.observe(n, t)
    got = reg.loss()
    want = sum((0.3 + i) * balance(logits[n], kinds[n]) for i, n in enumerate("abcd"))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for a, b in zip(
        torch.autograd.grad(got, list(logits.values())),
        torch.autograd.grad(want, list(logits.values())),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_sequence_balance_token_ids_calls_and_one_sequence() -> None:
    """Per-token ids (``[batch, time]``, sequences interleaved and split over two calls), empty rows
    left out of the mean; one sequence holding every token is ``LoadBalance``."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(4, 6, EXPERTS, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(4, 6, generator=g) > 0.3
    ids = torch.randint(0, 3, (4, 6), generator=g) * 2  # rows 0, 2, 4 of 7; 1, 3, 5, 6 stay empty
    reg = _observed(actreg.SequenceBalance(EXPERTS, TOP_K, 0.5, 7, score="sigmoid"))
    reg.observe("router", x[:2], mask[:2], sequence=ids[:2])
    reg.observe("router", x[2:], mask[2:], sequence=ids[2:])
    got = reg.loss()
    terms = [balance(x[mask & (ids == s)], "sigmoid") for s in (0, 2, 4) if (mask & (ids == s)).any()]
    want = 0.5 * torch.stack(terms).mean()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0], rtol=1e-10, atol=1e-14
    )

    seq = _observed(actreg.SequenceBalance(EXPERTS, TOP_K, 0.5, 2))
    pooled = actreg.ActivityRegularizer(
        nn.Module(), {"r": actreg.LoadBalance(EXPERTS, TOP_K, 0.5)}, observed=["r"]
    )
    seq.observe("router", x, mask, sequence=torch.tensor(1))
    pooled.observe("r", x, mask)
    torch.testing.assert_close(seq.loss(), pooled.loss(), rtol=1e-12, atol=0)


def test_sequence_balance_misuse_is_reported() -> None:
    """Ids only through observe (refused on a module, a TypeError for float ids, a ValueError for a
    slot without SequenceBalance); none given is a RecordingError; an id out of range makes the step
    non-finite (decided on the device, raised at the next call); nothing recorded is 0."""
    model = nn.ModuleDict({"router": nn.Linear(3, EXPERTS)})
    with pytest.raises(ValueError, match=r"sequence indices reach it only through reg.observe\('router'"):
        actreg.ActivityRegularizer(model, {"router": actreg.SequenceBalance(EXPERTS, 1, 1.0, 2)})
    reg = _observed(actreg.SequenceBalance(EXPERTS, 1, 1.0, 2))
    x = torch.randn(2, 3, EXPERTS)
    with pytest.raises(TypeError, match="sequence must be an integer tensor"):
        reg.observe("router", x, sequence=torch.zeros(2, 1))
    other = _observed(actreg.LoadBalance(EXPERTS, 1, 1.0))
    with pytest.raises(ValueError, match="takes sequence indices; only SequenceBalance does"):
        other.observe("router", x, sequence=torch.zeros(2, 1, dtype=torch.long))

    assert reg.loss().item() == 0.0  # nothing recorded
    reg.observe("router", x)
    reg.loss()
    with pytest.raises(actreg.RecordingError, match="needs each token's global sequence index"):
        reg.check()

    reg = _observed(actreg.SequenceBalance(EXPERTS, 1, 1.0, 2))
    reg.observe("router", x, sequence=torch.zeros(3, dtype=torch.long))  # [3] over positions [2, 3]: fine
    reg.observe("router", x, sequence=torch.zeros(2, dtype=torch.long))
    reg.loss()
    with pytest.raises(
        actreg.RecordingError, match=r"sequence of shape \(2,\) does not broadcast over the positions"
    ):
        reg.check()

    reg = _observed(actreg.SequenceBalance(EXPERTS, 1, 1.0, 2))
    keep = torch.tensor([[True, True, True], [True, False, True]])
    ids = torch.tensor([[0, 1, 1], [1, 7, 0]])  # 7 is out of range, but masked: fine
    reg.observe("router", x, keep, sequence=ids)
    assert torch.isfinite(reg.loss())
    reg.check()
    reg.observe("router", x, sequence=ids)  # now kept
    assert reg.loss().item() == 0.0
    with pytest.raises(actreg.NonFiniteStatisticError):
        reg.check()


def _row_sums(x: Tensor, mask: Tensor, ids: Tensor, rows: int, kind: str) -> dict[str, Tensor]:
    """Per sequence index: kept tokens, top-k choices per expert, summed scores (float64, by loops)."""
    n = torch.zeros(rows, dtype=x.dtype)
    a = torch.zeros(rows, x.shape[-1], dtype=x.dtype)
    p = torch.zeros(rows, x.shape[-1], dtype=x.dtype)
    for s in range(rows):
        t = x[mask & (ids == s)]
        n[s] = len(t)
        if len(t):
            top = torch.topk(scores(t, kind), TOP_K, dim=-1).indices
            a[s] = torch.stack([(top == j).sum() for j in range(x.shape[-1])]).to(x.dtype)
            p[s] = scores(t, kind).sum(0)
    return {"n": n, "a": a, "p": p}


def test_sequence_balance_ema_state_and_checkpointing() -> None:
    """``ema``: the moving average of the rows (by index), the value of the average (rows ever used
    count in S); the state round-trips; a non-reentrant activation checkpoint around the router and
    its ``observe`` records once and gives the same gradient."""
    decay, rows, weight = 0.6, 4, 0.7
    g = torch.Generator().manual_seed(9)
    router = nn.Linear(3, EXPERTS).double()
    reg = _observed(
        actreg.SequenceBalance(EXPERTS, TOP_K, weight, rows, score="sigmoid"), sync="ema", decay=decay
    )
    avg: dict[str, Tensor] | None = None
    for step in range(3):
        x = torch.randn(3, 5, 3, generator=g, dtype=torch.float64)
        mask = torch.rand(3, 5, generator=g) > 0.3
        ids = torch.tensor([[step % 2], [2], [3 if step else 2]])  # row 1 joins at step 1

        def forward(inp: Tensor, mask: Tensor = mask, ids: Tensor = ids) -> Tensor:
            logits = router(inp)
            reg.observe("router", logits, mask, sequence=ids)
            return logits

        logits = torch.utils.checkpoint.checkpoint(forward, x, use_reentrant=False)
        got = reg.loss()
        (got + 0.0 * logits.sum()).backward()
        grad = [p.grad.clone() for p in router.parameters()]
        router.zero_grad()

        s = _row_sums(router(x), mask, ids.expand(3, 5), rows, "sigmoid")
        avg = {
            k: (1 - decay) * v if avg is None else decay * avg[k].detach() + (1 - decay) * v
            for k, v in s.items()
        }
        n = avg["n"].clamp_min(1e-300).unsqueeze(-1)
        per_row = EXPERTS * ((avg["a"] / (n * TOP_K)) * (avg["p"] / n)).sum(-1)
        want = weight * per_row.sum() / (avg["n"] > 0).sum()
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        ref = torch.autograd.grad(want, list(router.parameters()))
        for a, b in zip(grad, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    state = reg.state_dict()
    again = _observed(
        actreg.SequenceBalance(EXPERTS, TOP_K, weight, rows, score="sigmoid"), sync="ema", decay=decay
    )
    again.load_state_dict(state)
    loaded = again.state_dict()
    assert loaded["ema"]["router"]["SequenceBalance"]["count"].shape == (rows,)
    torch.testing.assert_close(loaded["ema"], state["ema"], rtol=0, atol=0)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_sequence_balance_is_megatrons_seq_aux_loss(score: str) -> None:
    """Megatron-Core's ``seq_aux_loss`` (sequence-first logits ``[S, B, E]``, scores reshaped to
    ``[S, B*E]``, ``switch_load_balancing_loss_func(...) / B``) equals ``SequenceBalance(E, k, c, B)``
    with ``sequence = arange(B)`` over the batch dimension."""
    S, B, E, k, c = 7, 3, 6, 2, 1e-2
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(S, B, E, generator=g, dtype=torch.float64, requires_grad=True)
    if score == "softmax":
        probs = torch.softmax(logits, dim=-1)
    else:  # Megatron's sigmoid router: scores normalised for the aux loss (eps left out here)
        probs = torch.sigmoid(logits) / torch.sigmoid(logits).sum(-1, keepdim=True)
    routing_map = torch.zeros(S, B, E, dtype=torch.bool).scatter(-1, torch.topk(probs, k).indices, True)
    tokens_per_expert = routing_map.reshape(S, B * E).sum(0).to(logits.dtype)  # per (sequence, expert)
    aggregated = probs.reshape(S, B * E).sum(0)
    megatron = (aggregated * tokens_per_expert).sum() * E * c / (k * S * S) / B
    reg = _observed(actreg.SequenceBalance(E, k, c, B, score=score))
    reg.observe("router", logits, sequence=torch.arange(B).unsqueeze(0))  # [1, B] over [S, B]
    got = reg.loss()
    torch.testing.assert_close(got, megatron, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        torch.autograd.grad(got, logits)[0], torch.autograd.grad(megatron, logits)[0], rtol=1e-10, atol=1e-15
    )
