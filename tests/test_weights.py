"""Weight penalties: ``λ·Σp²`` / ``λ·Σ|p|`` of whole parameters, exact under DDP and FSDP2.

The reference is one process in float64 on the concatenated batch: the L1 activity penalty of
layer "1" and the weight penalties written out here from their definitions (torch.autograd for
the gradients), then plain SGD. Distributed runs: W = 2 and 3 gloo ranks with uneven batch shards
(W = 3 has an empty one) and parameters whose first dimension (7, 3) shards unevenly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import actreg
import dist_cases_weights as cases
import reference
from problem import batch


def _penalty(params: list[torch.Tensor], x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    w0, b0, w2, b2 = params
    h = torch.sigmoid(x @ w0.T + b0)[mask]
    l1 = 0.7 * h.abs().sum() / h.shape[0]
    weights = 0.3 * (w0.pow(2).sum() + w2.pow(2).sum())
    layer2 = 0.2 * (w2.abs().sum() + b2.abs().sum()) + 0.1 * (w2.pow(2).sum() + b2.pow(2).sum())
    return l1 + weights + layer2


def _reference() -> dict:
    params = [p.detach().clone().requires_grad_(True) for p in cases.make_model().parameters()]
    losses, grads = [], []
    for step in range(cases.STEPS):
        x, mask = batch(step)
        loss = _penalty(params, x, mask)
        losses.append(float(loss.detach()))
        grads.append([g.numpy().copy() for g in reference.sgd_step(loss, params, cases.LR)])
    return {"loss": losses, "grads": grads, "params": [p.detach().numpy() for p in params]}


REFERENCE = _reference()


def _check(results: list[dict], what: str) -> None:
    for rank, got in enumerate(results):
        np.testing.assert_allclose(got["loss"], REFERENCE["loss"], rtol=1e-12, err_msg=f"{what} rank {rank}")
        for step in range(cases.STEPS):
            for i, (g, r) in enumerate(zip(got["grads"][step], REFERENCE["grads"][step], strict=True)):
                msg = f"{what} rank {rank} step {step} param {i}"
                np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-13, err_msg=msg)
        for p, r in zip(got["params"], REFERENCE["params"], strict=True):
            np.testing.assert_allclose(p, r, rtol=1e-10, atol=1e-13, err_msg=f"{what} rank {rank}")


def test_single_process_value_gradient_and_metrics():
    model = cases.make_model()
    reg = cases.regularizer(model)
    x, mask = batch(0)
    with reg.mask(mask):
        model(x)
    loss = reg.loss()
    params = list(model.parameters())
    expected = _penalty(params, x, mask)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-13)
    got = torch.autograd.grad(loss, params)
    for g, r in zip(got, torch.autograd.grad(expected, params), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-14)
    m = reg.metrics()
    w0, _, w2, b2 = (p.detach() for p in params)
    assert m["weights/WeightL2"] == pytest.approx(0.3 * float(w0.pow(2).sum() + w2.pow(2).sum()), rel=1e-13)
    assert m["weights/WeightL1"] == pytest.approx(0.2 * float(w2.abs().sum() + b2.abs().sum()), rel=1e-13)
    assert m["weights/WeightL2_2"] == pytest.approx(0.1 * float(w2.pow(2).sum() + b2.pow(2).sum()), rel=1e-13)
    assert m["total"] == pytest.approx(loss.item(), rel=1e-13)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_counts_each_parameter_once(pools, world_size):
    results = pools[world_size].run(cases.train, "ddp", "after", timeout=120)
    _check(results, f"ddp W={world_size}")


@pytest.mark.parametrize("built", ["before", "after"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_fsdp2_sums_whole_parameters_in_the_one_collective(pools, world_size, built):
    results = pools[world_size].run(cases.train, "fsdp", built, timeout=120)
    assert all(t == "DTensor" for t in results[0]["sharded"])  # the parameters really are shards
    _check(results, f"fsdp W={world_size} built {built}")
    for got in results:  # no extra collective: one all_reduce per loss() after the first step
        assert got["collectives"][1] == ["c10d::allreduce_"], got["collectives"]


def test_sharded_parameters_refuse_local_mode(pools):
    for message in pools[2].run(cases.local_mode_with_shards, timeout=60):
        assert "communicates nothing (sync='local')" in message


def test_weights_alone_and_bad_globs():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    reg = actreg.ActivityRegularizer(model, {}, weights={"1.bias": actreg.WeightL2(2.0)})
    assert reg.loss().item() == pytest.approx(2.0 * float(model[1].bias.detach().pow(2).sum()), rel=1e-6)
    with pytest.raises(ValueError, match=r"'2\.weight' matches no parameter.*'[01]\.weight'"):
        actreg.ActivityRegularizer(model, {}, weights={"2.weight": actreg.WeightL2(1.0)})
    with pytest.raises(TypeError, match="WeightL2"):
        actreg.ActivityRegularizer(model, {}, weights={"*": actreg.L2(1.0)})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="penalties is empty"):
        actreg.ActivityRegularizer(model, {})
    for bad in (-1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="finite number >= 0"):
            actreg.WeightL2(bad)  # type: ignore[arg-type]


def test_tied_parameters_count_once():
    emb = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    reg = actreg.ActivityRegularizer(model, {}, weights={"*.weight": actreg.WeightL2(1.0)})
    assert reg.loss().item() == pytest.approx(float(emb.weight.detach().pow(2).sum()), rel=1e-6)


def _weight_ops(layers: int) -> int:
    """Top-level aten ops of one loss()+backward() of a WeightL2 over ``layers`` weights."""
    from torch.profiler import ProfilerActivity, profile

    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(layers)])
    reg = actreg.ActivityRegularizer(model, {}, weights={"*.weight": actreg.WeightL2(1e-4)})
    for _ in range(2):
        reg.loss().backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        reg.loss().backward()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    return sum(1 for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))


def test_weight_penalty_ops_do_not_grow_per_parameter_beyond_the_gradient_accumulation():
    # one fused norm forward and one fused multiply backward for any number of parameters; what
    # grows is autograd's accumulation into each parameter's .grad (one op each)
    assert _weight_ops(8) - _weight_ops(1) <= 7
