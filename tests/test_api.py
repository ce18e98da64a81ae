"""Single-process behaviour of the public API (no process group: behaves as one rank)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import actreg
import reference
from problem import batch, make_model


class TwoBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU())
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def test_pattern_without_module_names_close_modules():
    with pytest.raises(ValueError, match=r"'encoder\.5'.*matches no module.*'encoder\.[0-3]'"):
        actreg.ActivityRegularizer(TwoBranch(), {"encoder.5": actreg.L1(1.0)})


def test_penalty_values_are_checked():
    with pytest.raises(TypeError, match=r"is the string 'L1'; give penalty objects, e\.g\. .*actreg\.L1"):
        actreg.ActivityRegularizer(TwoBranch(), {"head": "L1"})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="must be a Penalty"):
        actreg.ActivityRegularizer(TwoBranch(), {"head": [actreg.L1(1.0), 3]})  # type: ignore[list-item]
    with pytest.raises(TypeError, match="penalties must be a mapping"):
        actreg.ActivityRegularizer(TwoBranch(), "L1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sync must be one of"):
        actreg.ActivityRegularizer(TwoBranch(), {"head": actreg.L1(1.0)}, sync="global-ish")
    with pytest.raises(ValueError, match="decay"):
        actreg.ActivityRegularizer(TwoBranch(), {"head": actreg.L1(1.0)}, decay=1.0)
    with pytest.raises(ValueError, match="target"):
        actreg.KLSparsity(target=1.5, weight=1.0)


def test_glob_matches_each_module_as_its_own_slot():
    reg = actreg.ActivityRegularizer(TwoBranch(), {"encoder.*": actreg.L1(1.0), "encoder.3": actreg.L2(0.5)})
    assert reg.slot_names == ["encoder.0", "encoder.1", "encoder.2", "encoder.3"]
    model = TwoBranch().double()
    reg = actreg.ActivityRegularizer(model, {"encoder.[13]": actreg.L1(1.0)})
    x = torch.randn(8, 5, dtype=torch.float64)
    model(x)
    got = reg.loss().item()
    h1 = model.encoder[1](model.encoder[0](x))
    h3 = model.encoder[3](model.encoder[2](h1))
    expected = h1.abs().sum() / 8 + h3.abs().sum() / 8
    assert got == pytest.approx(expected.item(), rel=1e-12)


def test_no_process_group_matches_direct_formula_for_every_penalty():
    x, mask = batch(0)
    for name, (src, pattern) in reference_cases().items():
        model = make_model()
        reg = actreg.ActivityRegularizer(model, {pattern: eval(src, vars(actreg))})
        with reg.mask(mask):
            model(x)
        act = reference.activations(list(model.parameters()), x, pattern)
        assert reg.loss().item() == pytest.approx(reference.direct(name, act, mask).item(), rel=1e-10), name
        reg.remove()


def reference_cases():
    from problem import CASES

    return CASES


def test_module_called_twice_accumulates():
    model = TwoBranch().double()
    reg = actreg.ActivityRegularizer(model, {"head": actreg.VarianceFloor(1.0, gamma=2.0)})
    a, b = torch.randn(4, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    model(a)
    model(b)
    got = reg.loss().item()
    reg.remove()
    h = torch.cat([model(a), model(b)])
    expected = torch.relu(2.0 - torch.sqrt(h.var(0) + 1e-4)).mean()
    assert got == pytest.approx(expected.item(), rel=1e-12)


def test_observe_with_mask_and_declared_names():
    model = TwoBranch()
    with pytest.raises(ValueError, match="observed="):
        actreg.ActivityRegularizer(model, {"router": actreg.ZLoss(1.0)})
    reg = actreg.ActivityRegularizer(model, {"router": actreg.ZLoss(0.5)}, observed=["router"])
    logits = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    reg.observe("router", logits, mask=mask)
    loss = reg.loss()
    expected = 0.5 * torch.logsumexp(logits[mask], -1).pow(2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    (g,) = torch.autograd.grad(loss, logits)
    (r,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(g, r, rtol=1e-12, atol=0)
    assert torch.all(g[~mask] == 0)
    with pytest.raises(ValueError, match="no penalties are registered"):
        reg.observe("routr", logits)


def test_mask_context_applies_to_matching_modules_only():
    model = TwoBranch().double()
    reg = actreg.ActivityRegularizer(model, {"encoder.1": actreg.L1(1.0), "head": actreg.L1(1.0)})
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    with reg.mask(mask, modules="encoder.*"):
        y = model(x)
    got = reg.loss().item()
    h = model.encoder[1](model.encoder[0](x))
    expected = h[mask].abs().sum() / 6 + y.abs().sum() / 8
    assert got == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("glob", ["encodr.*", "encoder.0", "typo*"])
def test_mask_glob_matching_no_regularized_module_is_a_value_error(glob: str) -> None:
    """A ``modules=`` glob that would mask nothing (a typo, an unregularized module) is refused at
    the call, naming the glob and the regularized modules, as a penalty glob matching nothing is."""
    model = TwoBranch().double()
    reg = actreg.ActivityRegularizer(model, {"encoder.1": actreg.L1(1.0), "head": actreg.L1(1.0)})
    mask = torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    refused = r"reg\.mask\(modules=\.\.\.\) pattern .* matches no regularized module"
    with pytest.raises(ValueError, match=refused) as info:
        with reg.mask(mask, modules=glob):
            pytest.fail("the block must not run")
    assert repr(glob) in str(info.value) and "'encoder.1'" in str(info.value)
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    y = model(x)  # nothing masked, nothing left over from the refused call
    h = model.encoder[1](model.encoder[0](x))
    assert reg.loss().item() == pytest.approx((h.abs().sum() / 8 + y.abs().sum() / 8).item(), rel=1e-12)


def test_nothing_recorded_without_autograd():
    model = TwoBranch()
    reg = actreg.ActivityRegularizer(model, {"head": actreg.L1(1.0)})
    with torch.no_grad():
        model(torch.randn(4, 5))
    assert reg.loss().item() == 0.0


def test_recording_errors_surface_at_the_next_call():
    """The step that failed gives a zero penalty (decided on the device); the next call raises."""
    model = TwoBranch()
    reg = actreg.ActivityRegularizer(model, {"head": actreg.LoadBalance(num_experts=4, top_k=1, weight=1.0)})
    model(torch.randn(4, 5))
    assert reg.loss().item() == 0.0
    with pytest.raises(actreg.RecordingError, match=r"step 1: 'head'.*num_experts=4.*3 features"):
        reg.loss()
    reg2 = actreg.ActivityRegularizer(model, {"head": actreg.L1(1.0)}, observed=[])
    model(torch.randn(4, 5))
    reg2.loss()
    reg2.observe("head", torch.randn(4, 7))
    for call in (reg2.metrics, reg2.state_dict, reg2.check, reg2.loss):
        model(torch.randn(4, 5))
        reg2.observe("head", torch.randn(4, 7))
        assert reg2.loss().item() == 0.0
        with pytest.raises(actreg.RecordingError, match="7 features, earlier ones had 3"):
            call()


def test_tuple_output_records_first_element_and_other_outputs_error():
    lstm = nn.LSTM(3, 4, batch_first=True)
    reg = actreg.ActivityRegularizer(nn.Sequential(lstm), {"0": actreg.TAR(beta=1.0, time_dim=1)})
    out, _ = lstm(torch.randn(2, 5, 3))
    expected = (out[:, 1:] - out[:, :-1]).pow(2).mean()
    assert reg.loss().item() == pytest.approx(expected.item(), rel=1e-6)

    class DictOut(nn.Module):
        def forward(self, x):
            return {"y": x}

    reg = actreg.ActivityRegularizer(nn.Sequential(DictOut()), {"0": actreg.L1(1.0)})
    reg._root(torch.randn(2, 3))  # the unwrapped model
    assert reg.loss().item() == 0.0
    with pytest.raises(actreg.RecordingError, match=r"dict, not a tensor.*observe"):
        reg.check()


def test_metrics_activity_figures():
    model = TwoBranch()
    reg = actreg.ActivityRegularizer(model, {"encoder.1": actreg.L1(0.5)})
    assert reg.metrics() == {}
    x = torch.randn(16, 5)
    with torch.no_grad():
        model.encoder[0].bias[2] = -100.0  # unit 2 is dead after the ReLU
    model(x)
    reg.loss()
    m = reg.metrics()
    h = model.encoder[1](model.encoder[0](x)).detach()
    assert m["encoder.1/count"] == 16
    assert m["encoder.1/dead_units"] == 1
    assert m["encoder.1/active_fraction"] == pytest.approx((h > 0).float().mean().item(), rel=1e-6)
    assert m["encoder.1/mean_abs"] == pytest.approx(h.abs().mean().item(), rel=1e-6)
    assert m["encoder.1/L1"] == pytest.approx(0.5 * h.abs().sum().item() / 16, rel=1e-6)
    assert m["total"] == m["encoder.1/L1"]


def test_remove_and_context_manager():
    model = TwoBranch()
    with actreg.ActivityRegularizer(model, {"head": actreg.L1(1.0)}) as reg:
        model(torch.randn(2, 5))
        assert reg.loss().item() > 0
    assert not model.head._forward_hooks
    model(torch.randn(2, 5))
    assert reg.loss().item() == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_activations_accumulate_in_float32(dtype):
    g = torch.Generator().manual_seed(0)
    x = (1.0 + 0.01 * torch.randn(8192, 4, generator=g)).to(dtype)
    reg = actreg.ActivityRegularizer(nn.Sequential(nn.Identity()), {"v": actreg.L2(1.0)}, observed=["v"])
    reg.observe("v", x)
    got = reg.loss()
    assert got.dtype == torch.float32
    exact = x.double().pow(2).sum() / 8192
    # a bf16/fp16 result would carry a rounding error of ~1e-3 relative
    assert got.item() == pytest.approx(exact.item(), rel=1e-5)


def test_autocast_does_not_lower_statistic_precision():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16))
    reg = actreg.ActivityRegularizer(model, {"0": actreg.DeCov(1.0)})
    x = torch.randn(4096, 8) + 3.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model(x)
    assert h.dtype == torch.bfloat16
    got = reg.loss().item()
    c = torch.cov(h.double().T, correction=0)
    expected = 0.5 * (c.pow(2).sum() - torch.diagonal(c).pow(2).sum()).item()
    assert got == pytest.approx(expected, rel=1e-4)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_ema_keeps_no_graph_and_memory_stays_flat():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10))
    reg = actreg.ActivityRegularizer(model, {"1": [actreg.L1(1e-3), actreg.Covariance(1e-3)]}, sync="ema")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    refs = []
    rss = []
    for step in range(100):
        x = torch.randn(256, 256)
        out = model(x)
        refs.append(weakref.ref(out))
        loss = out.pow(2).mean() + reg.loss()
        opt.zero_grad()
        loss.backward()  # a kept graph of an earlier step would fail here or leak
        opt.step()
        del out, loss
        if step in (10, 99):
            gc.collect()
            rss.append(_rss_bytes())
    state = reg.state_dict()
    assert state["step"] == 100
    for per_label in state["ema"].values():
        for stats in per_label.values():
            assert all(t.grad_fn is None and not t.requires_grad for t in stats.values())
    gc.collect()
    assert sum(r() is not None for r in refs) == 0  # no activation of any step is kept alive
    # a kept graph holds >= 1 MB of activations per step: 90 steps would be >= 90 MB
    assert rss[1] - rss[0] < 20 * 2**20, rss


def test_readme_custom_penalty_is_the_tested_one():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    source = (root / "tests" / "custom_penalty.py").read_text()
    snippet = source.split("# --8<-- [start:custom]\n")[1].split("# --8<-- [end:custom]")[0].strip()
    readme = (root / "README.md").read_text()
    assert snippet in readme


def test_observed_module_name_is_recorded_through_observe_only():
    model = TwoBranch()
    reg = actreg.ActivityRegularizer(
        model, {"head": actreg.ZLoss(1.0), "encoder.*": actreg.L1(0.0)}, observed=["head"]
    )
    assert not model.head._forward_hooks
    model(torch.randn(3, 5))  # the head's output (3 features) is not recorded
    logits = torch.randn(4, 2, 7)
    reg.observe("head", logits)
    assert reg.loss().item() == pytest.approx(torch.logsumexp(logits, -1).pow(2).mean().item(), rel=1e-6)


@pytest.mark.parametrize("sync", ["global", "ema"])
def test_second_moments_stay_accurate_when_mean_dominates(sync):
    """float32 activations with |mean| = 1000 * std: moments are taken around a shift.

    Without it, float32 sums of x^2 (~4.6e7) lose the variance (~46) to rounding (errors of ~100%).
    """
    from dist_cases import large_mean_batch

    penalties = [actreg.VarianceFloor(1.0, gamma=1.0), actreg.Covariance(1.0), actreg.DeCov(1.0)]
    reg = actreg.ActivityRegularizer(nn.Identity(), {"h": penalties}, observed=["h"], sync=sync, decay=0.5)
    batches = [large_mean_batch(step).float() for step in range(4)]
    expected = reference.moment_penalties([x.double() for x in batches], sync)
    for step, x in enumerate(batches):
        reg.observe("h", x)
        reg.loss()
        got = reg.metrics()
        for key, value in expected[step].items():
            assert got[key] == pytest.approx(value, rel=2e-3), (step, key, got[key], value)


def test_activation_checkpointing_records_once_with_exact_gradients():
    """Non-reentrant checkpointing recomputes the forward in backward: nothing is recorded twice."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 6), nn.Tanh()), nn.Linear(6, 2)).double()
    penalties = {"0.1": [actreg.VarianceFloor(1.0, gamma=2.0), actreg.L1(0.3)]}
    reg = actreg.ActivityRegularizer(model, penalties, sync="ema", decay=0.5)
    xs = [torch.randn(5, 4, dtype=torch.float64) for _ in range(3)]
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    ema = None
    for x in xs:
        h = checkpoint(model[0], x, use_reentrant=False)
        loss = reg.loss() + 0.0 * model[1](h).sum()
        model.zero_grad()
        loss.backward()
        assert reg.metrics()["0.1/count"] == 5  # not 10: the recomputation recorded nothing
        # reference: EMA of plain sums, written out
        r = torch.tanh(x @ params[0].T + params[1])
        s = {
            "n": torch.tensor(5.0, dtype=torch.float64),
            "s": r.sum(0),
            "q": r.pow(2).sum(0),
            "a": r.abs().sum(),
        }
        ema = (
            {k: 0.5 * v for k, v in s.items()}
            if ema is None
            else {k: 0.5 * ema[k].detach() + 0.5 * s[k] for k in s}
        )
        nb = 5.0
        var = (ema["q"] / ema["n"] - (ema["s"] / ema["n"]) ** 2) * nb / (nb - 1)
        ref = torch.relu(2.0 - torch.sqrt(var + 1e-4)).mean() + 0.3 * ema["a"] / ema["n"]
        grads = torch.autograd.grad(ref, params[:2])
        assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
        torch.testing.assert_close(model[0][0].weight.grad, grads[0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(model[0][0].bias.grad, grads[1], rtol=1e-9, atol=1e-12)


def test_reentrant_checkpointing_is_reported_not_silent():
    from torch.utils.checkpoint import checkpoint

    model = nn.Sequential(nn.Sequential(nn.Linear(4, 6), nn.Tanh()), nn.Linear(6, 2))
    reg = actreg.ActivityRegularizer(model, {"0.1": actreg.L1(1.0)})
    x = torch.randn(5, 4, requires_grad=True)
    h = checkpoint(model[0], x, use_reentrant=True)
    loss = reg.loss() + model[1](h).sum()
    with pytest.warns(RuntimeWarning, match="use_reentrant=False"):
        loss.backward()


def test_torch_compile_still_records_every_call():
    """Hooks on submodules of a torch.compile'd model still record (dynamo traces them)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    x = torch.randn(5, 4)
    grads, values = [], []
    for compiled in (False, True):
        reg = actreg.ActivityRegularizer(model, {"1": [actreg.VarianceFloor(1.0, gamma=2.0), actreg.L1(0.3)]})
        run = torch.compile(model, backend="aot_eager") if compiled else model
        for _ in range(2):
            model.zero_grad()
            out = run(x)
            (reg.loss() + out.sum()).backward()
            assert reg.metrics()["1/count"] == 5
        values.append(reg.metrics()["total"])
        grads.append([p.grad.clone() for p in model.parameters()])
        reg.remove()
    assert values[1] == pytest.approx(values[0], rel=1e-6) and values[0] > 0
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_activity_threshold():
    model = TwoBranch()
    reg = actreg.ActivityRegularizer(model, {"encoder.0": actreg.L1(0.0)}, activity_threshold=0.5)
    x = torch.randn(64, 5)
    model(x)
    reg.loss()
    h = model.encoder[0](x).detach()
    m = reg.metrics()
    assert m["encoder.0/active_fraction"] == pytest.approx((h.abs() > 0.5).float().mean().item(), rel=1e-6)
    assert m["encoder.0/dead_units"] == float(((h.abs() > 0.5).sum(0) == 0).sum())


def test_ema_survives_a_slot_that_starts_running_later():
    """A slot first recorded at step 3 changes the buffer's layout: the moving average of the
    slots recorded before it must carry over exactly (float64 reference of the EMA by hand)."""
    reg = actreg.ActivityRegularizer(
        nn.Identity(), {"a": actreg.L1(1.0), "b": actreg.L2(1.0)}, observed=["a", "b"], sync="ema", decay=0.5
    )
    g = torch.Generator().manual_seed(3)
    ema_a = ema_b = None
    for step in range(5):
        xa = torch.randn(6, 3, dtype=torch.float64, generator=g)
        reg.observe("a", xa)
        sa = torch.stack([xa.abs().sum(), torch.tensor(6.0, dtype=torch.float64)])
        sb = torch.zeros(2, dtype=torch.float64)
        if step >= 2:
            xb = torch.randn(4, 5, dtype=torch.float64, generator=g)
            reg.observe("b", xb)
            sb = torch.stack([xb.pow(2).sum(), torch.tensor(4.0, dtype=torch.float64)])
        ema_a = 0.5 * sa if ema_a is None else 0.5 * ema_a + 0.5 * sa
        # b's average starts when b is first seen (its earlier steps are zeros either way)
        ema_b = 0.5 * sb if ema_b is None else 0.5 * ema_b + 0.5 * sb
        reg.loss()
        m = reg.metrics()
        assert m["a/L1"] == pytest.approx((ema_a[0] / ema_a[1]).item(), rel=1e-12), step
        if step >= 2:
            assert m["b/L2"] == pytest.approx((ema_b[0] / ema_b[1]).item(), rel=1e-12), step


def test_torch_compile_sees_no_graph_break_from_recording():
    """The hooks trace into the compiled graph: recording adds no graph break (torch._dynamo.explain)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    reg = actreg.ActivityRegularizer(
        model, {"1": [actreg.L1(0.1), actreg.VarianceFloor(1.0)], "3": [actreg.L2(0.1), actreg.DeCov(0.1)]}
    )
    x = torch.randn(5, 8)
    model(x)
    reg.loss().backward()  # the shifts of the centred slots exist from now on
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    reg.loss()
    assert reg.metrics()["3/count"] == 5  # the traced forward recorded
    reg.remove()


def test_two_penalties_of_one_kind_on_one_slot_add_up() -> None:
    """L1 + L1 and DeCov + DeCov on one module (found by the soak: the backward wrote one buffer
    position twice through a strided view and raised)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU()).double()
    reg = actreg.ActivityRegularizer(
        model, {"1": [actreg.L1(0.1), actreg.L1(0.2), actreg.DeCov(0.1), actreg.DeCov(0.3)]}
    )
    x = torch.randn(6, 4, dtype=torch.float64)
    model(x)
    loss = reg.loss()
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    # float64 reference from the formulas: L1 = w Σ|x| / n, DeCov = w ½ (‖C‖² − ‖diag C‖²)
    a = model[0](x).relu()
    c = a - a.mean(0)
    cov = c.T @ c / a.shape[0]
    ref = 0.3 * a.abs().sum() / a.shape[0] + 0.4 * 0.5 * ((cov**2).sum() - (cov.diagonal() ** 2).sum())
    grads = torch.autograd.grad(ref, list(model.parameters()))
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-12, atol=0)
    for g, r in zip(got, grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-14)


def test_gram_energy_backward_twice_through_a_retained_graph():
    """``OffDiagonalEnergy`` turns its ``C'`` into the gradient in place (no second ``d x d``
    buffer): a second backward through the same graph (``retain_graph=True``) recomputes it, and
    both give the gradients of ``sum_{i != j} C_ij^2`` by autograd of the formula (float64)."""
    from actreg.moments import OffDiagonalEnergy

    torch.manual_seed(0)
    rows = torch.randn(3, 20, 5, dtype=torch.float64) + 2.0
    outer = (rows.mT @ rows).requires_grad_()
    total = rows.sum(1).requires_grad_()
    count = torch.full((3,), 20.0, dtype=torch.float64)
    energy = (OffDiagonalEnergy.apply(outer, total, count) * torch.tensor([1.0, 2.0, 3.0])).sum()
    first = torch.autograd.grad(energy, (outer, total), retain_graph=True)
    second = torch.autograd.grad(energy, (outer, total))

    o, t = outer.detach().clone().requires_grad_(), total.detach().clone().requires_grad_()
    mean = t / 20
    cov = o / 20 - mean[:, :, None] * mean[:, None, :]
    per = cov.square().sum((-1, -2)) - torch.diagonal(cov, dim1=-2, dim2=-1).square().sum(-1)
    want = torch.autograd.grad((per * torch.tensor([1.0, 2.0, 3.0])).sum(), (o, t))
    for got in (first, second):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unbiased_penalties_stay_zero_on_one_row_per_step_in_ema(dtype):
    """``ema`` with one kept row per step: the bias-corrected average count is 1 only up to
    rounding, and the unbiased penalties must be 0 then (their n/(n-1) turned the rounding into a
    spike of 1e9 in float32 and 1e27 in float64; found by the soak, seed 90449)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).to(dtype)
    pens = [actreg.Covariance(1.0), actreg.VarianceFloor(1.0, 1.0)]
    reg = actreg.ActivityRegularizer(model, {"1": pens}, sync="ema", decay=0.8)
    for _ in range(6):
        model.zero_grad()
        model(torch.randn(1, 3, dtype=dtype))
        loss = reg.loss()
        loss.backward()
        assert loss.item() == 0.0
        assert all(torch.isfinite(p.grad).all() and not p.grad.any() for p in model.parameters())
