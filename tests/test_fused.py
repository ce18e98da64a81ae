"""Fused statistics kernels (actreg.fused): the same values and gradients as the eager statistics.

Every penalty family of tests/problem.py, masked and unmasked: 3 SGD steps of the float64 problem
model with ``fused=True``, against the float64 single-process reference written from the formulas
(tests/reference.py, ``rtol=1e-7`` as tests/test_exactness.py) and against ``fused=False``; one
process (in this process) and W = 2 gloo ranks with uneven shards. A float32 slot with every
primitive the kernels compute (``|x|``, ``x^2``, sums, centred sums and squares)
against float64; the Gram matrix's maths (DeCov, Covariance), fused under torch.compile only, in
a compiled model. Kernels are small (6 and 4 units, 21 positions) and compile once per layout and
process; inductor's on-disk cache serves the second process. The rest of the suite runs the eager
statistics (``ACTREG_FUSED=0`` in conftest.py).
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import actreg
import actreg.fused
import dist_cases_fused
import reference
from dist_cases import make_penalty
from problem import CASES, IN_FEATURES, LR, STEPS, batch, make_model

pytestmark = [
    pytest.mark.skipif(
        shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler"
    ),
    pytest.mark.skipif(not actreg.fused.available(), reason="this torch has no standalone_compile"),
]

RTOL = 1e-7
ATOL = 1e-12
NAMES = list(CASES)
#: families whose statistics the fused kernels compute and differentiate (the others record their
#: own statistics -- TAR's differences, router softmax/top-k counts, logsumexp -- next to a fused
#: block that only feeds the activity metrics)
FUSED_GRADIENT = ["L1", "L2", "AR", "KLSparsity", "DeCov", "VarianceFloor", "Covariance"]
#: families with a Gram matrix: fused (traced) under torch.compile only, the eager statistics
#: otherwise (their matmuls dominate; see benchmarks/README.md)
GRAM = {"DeCov", "Covariance"}


def _unmasked_batch(step: int) -> tuple[Tensor, Tensor]:
    x, mask = batch(step)
    return x, torch.ones_like(mask)


def _reference(name: str, masked: bool, world_size: int, monkeypatch: pytest.MonkeyPatch) -> dict:
    with monkeypatch.context() as m:
        if not masked:
            m.setattr(reference, "batch", _unmasked_batch)
        return reference.run(name, CASES[name][1], "global", world_size, STEPS)


def _train(name: str, masked: bool, fused: bool) -> dict[str, list]:
    """dist_cases_fused.train on one process without DDP."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    reg = actreg.ActivityRegularizer(model, {CASES[name][1]: make_penalty(name)}, fused=fused)
    grads, losses = [], []
    for step in range(STEPS):
        x, mask = batch(step)
        opt.zero_grad()
        if masked:
            with reg.mask(mask):
                y = model(x)
        else:
            y = model(x)
        loss = reg.loss()
        (loss + 0.0 * y.sum()).backward()  # every parameter gets a gradient, as in dist_cases
        grads.append([p.grad.detach().numpy().copy() for p in model.parameters()])
        losses.append(loss.item())
        opt.step()
    reg.remove()
    return {"grads": grads, "loss": losses}


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The number of fused kernel calls made while the test runs (one entry per call)."""
    made: list[int] = []
    original = actreg.fused.call

    def counting(kernel: actreg.fused.Kernel, *args: Tensor | None) -> tuple[Tensor, ...]:
        made.append(1)
        return original(kernel, *args)

    monkeypatch.setattr(actreg.fused, "call", counting)
    yield made


def _compare(got: dict, want: dict, what: str, rtol: float = RTOL, atol: float = ATOL) -> None:
    for step in range(STEPS):
        for i, (g, r) in enumerate(zip(got["grads"][step], want["grads"][step], strict=True)):
            np.testing.assert_allclose(g, r, rtol=rtol, atol=atol, err_msg=f"{what} step {step} param {i}")
        assert got["loss"][step] == pytest.approx(want["loss"][step], rel=rtol, abs=atol), (what, step)


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
@pytest.mark.parametrize("name", NAMES)
def test_one_process_matches_float64_reference_and_eager(
    name: str, masked: bool, monkeypatch: pytest.MonkeyPatch, calls: list[int]
) -> None:
    fused = _train(name, masked, fused=True)
    if name in GRAM:  # eager statistics outside torch.compile (see statistics._fusable)
        assert not calls, f"{name}: a fused kernel ran for a slot with a Gram matrix"
    else:
        assert calls, f"{name}: no fused kernel ran"
    _compare(fused, _reference(name, masked, 1, monkeypatch), f"{name} fused vs float64 reference")
    _compare(fused, _train(name, masked, fused=False), f"{name} fused vs eager", rtol=1e-10)
    assert any(np.abs(g).max() > 1e-4 for g in fused["grads"][0]), f"{name}: gradient is ~0"


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
def test_two_gloo_ranks_match_float64_reference(pools, masked: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """W = 2, shards of 5 and 2 sequences, DDP: every family with fused kernels, as one process."""
    ranks = pools[2].run(dist_cases_fused.train, NAMES, masked, True, timeout=600)
    for rank, result in enumerate(ranks):
        assert result["kernels"] > 0, f"rank {rank}: no fused kernel was compiled"
        for name in NAMES:
            _compare(result[name], _reference(name, masked, 2, monkeypatch), f"{name} W=2 rank {rank}")


def test_fsdp2_matches_float64_reference(pools, monkeypatch: pytest.MonkeyPatch) -> None:
    """FSDP2 ``fully_shard`` on 2 ranks (tests/test_exactness.py's case) with fused kernels on: the
    module output passes through the statistics' node (``FusedThrough``) under FSDP's hooks."""
    names = ["L1", "VarianceFloor", "Covariance", "KLSparsity"]
    results = pools[2].run(dist_cases_fused.fsdp2, names, timeout=600)
    if isinstance(results[0], str):
        pytest.skip(results[0])
    for name in names:
        ref = _reference(name, True, 2, monkeypatch)
        for rank, result in enumerate(results):
            assert result[name]["loss"] == pytest.approx(ref["loss"][0], rel=RTOL)
            for g, r in zip(result[name]["grads"], ref["grads"][0], strict=True):
                np.testing.assert_allclose(g, r, rtol=RTOL, atol=ATOL, err_msg=f"{name} FSDP2 rank {rank}")


def test_float32_every_primitive_against_float64(calls: list[int]) -> None:
    """One float32 slot with L1, L2, KLSparsity and VarianceFloor (every primitive the kernels
    compute outside torch.compile, centred sums and squares included), masked, a new batch size each
    step: values and gradients within float32 rounding of float64, and no kernel compiled after the
    first sizes."""
    penalties = ["L1", "L2", "KLSparsity", "VarianceFloor"]

    def run(dtype: torch.dtype, fused: bool) -> list[tuple[float, list[Tensor]]]:
        model = make_model().to(dtype)
        reg = actreg.ActivityRegularizer(model, {"1": [make_penalty(n) for n in penalties]}, fused=fused)
        out = []
        for step, rows in enumerate([7, 9, 12, 5]):
            g = torch.Generator().manual_seed(40 + step)
            x = torch.randn(rows, 3, IN_FEATURES, generator=g, dtype=torch.float64).to(dtype) * 1.5
            mask = torch.rand(rows, 3, generator=g) > 0.3
            if step == 2:
                compiled = len(actreg.fused.compile_seconds)
            model.zero_grad()
            with reg.mask(mask):
                y = model(x)
            loss = reg.loss()
            (loss + 0.0 * y.sum()).backward()
            out.append((loss.item(), [p.grad.double().clone() for p in model.parameters()]))
        if fused:
            assert len(actreg.fused.compile_seconds) == compiled, "a new batch size compiled a kernel"
        reg.remove()
        return out

    f32, e32, f64 = run(torch.float32, True), run(torch.float32, False), run(torch.float64, False)
    assert calls
    for (lf, gf), (le, ge), (l64, g64) in zip(f32, e32, f64, strict=True):
        assert lf == pytest.approx(l64, rel=2e-5) and lf == pytest.approx(le, rel=2e-6)
        for a, b, c in zip(gf, ge, g64, strict=True):
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(actreg.fused, "_compile", broken)
    monkeypatch.setattr(actreg.fused, "_kernels", {})
    monkeypatch.setattr(actreg.fused, "compile_seconds", {})
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        got = _train("L1", True, fused=True)
    _compare(got, _train("L1", True, fused=False), "L1 fallback vs eager", rtol=0, atol=0)


def test_opt_out(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Linear(3, 4))
    monkeypatch.setenv(actreg.fused.ENV, "0")
    assert not actreg.ActivityRegularizer(model, {"0": actreg.L1(1.0)}).fused
    assert actreg.ActivityRegularizer(model, {"0": actreg.L1(1.0)}, fused=True).fused
    monkeypatch.setenv(actreg.fused.ENV, "1")
    assert actreg.ActivityRegularizer(model, {"0": actreg.L1(1.0)}).fused
    assert not actreg.ActivityRegularizer(model, {"0": actreg.L1(1.0)}, fused=False).fused
    with pytest.raises(ValueError, match="fused must be"):
        actreg.ActivityRegularizer(model, {"0": actreg.L1(1.0)}, fused="yes")  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "kernels compiled" in actreg.fused.describe()


def test_output_passes_through_the_statistics_node() -> None:
    """A hooked module's output is passed through ``FusedThrough`` (its gradient takes the
    statistics' term in the same kernel): for tensor and tuple outputs, and checkpointed
    (non-reentrant) modules give the same gradients as the eager statistics."""
    from torch.utils.checkpoint import checkpoint

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(IN_FEATURES, 6)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            h = torch.sigmoid(self.lin(x))
            return h, h.sum(-1)

    def run(fused: bool, checkpointed: bool) -> tuple[str, list[Tensor]]:
        torch.manual_seed(0)
        model = nn.ModuleDict({"pair": Pair(), "head": nn.Linear(6, 2)}).double()
        reg = actreg.ActivityRegularizer(model, {"pair": make_penalty("L1")}, fused=fused)
        x, mask = batch(0)
        seen = []
        if checkpointed:  # (a mask set by reg.mask is not there when the checkpoint recomputes)
            h, s = checkpoint(model["pair"], x, use_reentrant=False)
        else:
            with reg.mask(mask):
                h, s = model["pair"](x)
        seen.append(type(h.grad_fn).__name__)
        loss = reg.loss() + model["head"](h).square().mean() + s.mean()
        loss.backward()
        reg.remove()
        return seen[0], [p.grad.clone() for p in model.parameters()]

    for checkpointed in (False, True):
        node, got = run(True, checkpointed)
        if not checkpointed:
            assert node == "FusedThroughBackward", node
        _, want = run(False, checkpointed)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_compiled_model_traces_the_fused_maths_without_graph_breaks() -> None:
    """Under torch.compile of the model the per-layer statistics are the fused maths traced into
    the model's graph (no kernel call, no graph break), with the eager values and gradients."""
    import torch._dynamo

    def step(run: object, model: nn.Module, reg: actreg.ActivityRegularizer, step: int) -> tuple[float, list]:
        x, mask = batch(step)
        model.zero_grad()
        with reg.mask(mask):
            y = run(x)  # type: ignore[operator]
        loss = reg.loss()
        (loss + 0.0 * y.sum()).backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    penalties = ["L1", "L2", "KLSparsity", "VarianceFloor", "DeCov"]
    results = []
    for compiled in (False, True):
        model = make_model()
        reg = actreg.ActivityRegularizer(model, {"1": [make_penalty(n) for n in penalties]}, fused=True)
        run = torch.compile(model, backend="aot_eager") if compiled else model
        results.append([step(run, model, reg, s) for s in range(STEPS)])
        if compiled:
            x, mask = batch(0)
            with reg.mask(mask):
                explained = torch._dynamo.explain(model)(x)
            reg.loss()
            assert explained.graph_break_count == 0, explained.break_reasons
        reg.remove()
    for (le, ge), (lc, gc) in zip(*results, strict=True):
        assert lc == pytest.approx(le, rel=1e-10)
        for a, b in zip(gc, ge, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_fused_training_step_never_reads_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """tests/test_hot_path.py's step check (every built-in penalty, a padding mask, ``global``)
    with the fused kernels on: no host read, no reading op (the kernels compile in its warm-up)."""
    import test_hot_path

    monkeypatch.setenv(actreg.fused.ENV, "1")
    before = len(actreg.fused.compile_seconds)
    test_hot_path.test_training_step_never_reads_the_device("global")
    assert len(actreg.fused.compile_seconds) > before or actreg.fused._kernels


def _same_steps(
    got: list[tuple[float, list[Tensor]]], want: list[tuple[float, list[Tensor]]], finite: bool = False
) -> None:
    """Every step's ``(loss, gradients)`` equal, float64: loss to 1e-12, gradients to 1e-12 / 1e-14
    (``finite``: and every gradient finite)."""
    assert len(got) == len(want)
    for step, ((lg, gg), (lw, gw)) in enumerate(zip(got, want, strict=True)):
        assert lg == pytest.approx(lw, rel=1e-12), step
        for a, b in zip(gg, gw, strict=True):
            if finite:
                assert torch.isfinite(a).all(), step
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def _independent_step_loss(outputs: list[tuple[Tensor, Tensor | None]]) -> Tensor:
    """``0.3 L1 + 0.2 L2`` of one step's recordings from the formulas (float64): sums over every
    kept row of every call, divided by the number of kept rows."""
    rows = sum(int(x.shape[0] if keep is None else keep.sum()) for x, keep in outputs)
    total = outputs[0][0].new_zeros(())
    for x, keep in outputs:
        kept = x if keep is None else x[keep]
        total = total + 0.3 * kept.abs().sum() + 0.2 * kept.square().sum()
    return total / rows


def test_fast_path_is_exact_and_steps_aside_when_anything_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unmasked, uncentred module output goes through ``KernelThrough`` (its kernels bound once)
    from the third step on; a new batch size, a second call in the step, a mask and a loaded state
    send that recording through the full path. Every step's penalty and gradient equal the formulas
    in float64 (autograd on the same tensors) and ``fused=False``."""
    from actreg.statistics import KernelThrough

    taken: list[int] = []
    original = KernelThrough.forward

    def counting(ctx: object, x: Tensor, through: object) -> tuple[Tensor, Tensor]:
        taken.append(x.shape[0])
        return original(ctx, x, through)  # type: ignore[arg-type]

    monkeypatch.setattr(KernelThrough, "forward", staticmethod(counting))
    # (rows, calls in the step, masked, reload the state before the step)
    plan = [(8, 1, False, False), (8, 1, False, False), (8, 1, False, False), (5, 1, False, False),
            (5, 1, False, False), (8, 2, False, False), (8, 1, True, False), (8, 1, False, True),
            (8, 1, False, False)]  # fmt: skip
    # whether the step's first call is fast: the first recording after the sizes are agreed (step
    # 1) sets the fast path up, the same shape uses it from then on; a step that leaves it sets it
    # up again for its own recording (a new shape, a reload), a masked step does not
    fast = [False, False, True, False, True, False, False, False, True]

    def run(fused: bool) -> list[tuple[float, list[Tensor], int]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(IN_FEATURES, 6), nn.Tanh(), nn.Linear(6, 2)).double()
        reg = actreg.ActivityRegularizer(model, {"1": [actreg.L1(0.3), actreg.L2(0.2)]}, fused=fused)
        gen = torch.Generator().manual_seed(1)
        out = []
        for rows, calls, masked, reload in plan:
            if reload:
                state = reg.state_dict()
                reg.load_state_dict(state)
            model.zero_grad()
            before = len(taken)
            seen: list[tuple[Tensor, Tensor | None]] = []
            for _ in range(calls):
                x = torch.randn(rows, IN_FEATURES, generator=gen, dtype=torch.float64)
                keep = (torch.arange(rows) % 3 != 0) if masked else None
                with reg.mask(keep) if masked else contextlib.nullcontext():
                    h = model[1](model[0](x))
                seen.append((torch.tanh(model[0](x)).detach(), keep))  # (not through the hook)
                h.sum().mul(0.1).backward(retain_graph=True)  # the output's own gradient flows too
            loss = reg.loss()
            want = _independent_step_loss(seen)
            assert loss.item() == pytest.approx(want.item(), rel=1e-12), (fused, rows, calls, masked)
            loss.backward()
            out.append((loss.item(), [p.grad.clone() for p in model[0].parameters()], len(taken) - before))
        reg.remove()
        return out

    got, want = run(True), run(False)
    assert [n > 0 for _, _, n in got] == fast, [n for _, _, n in got]
    _same_steps([(loss, g) for loss, g, _ in got], [(loss, g) for loss, g, _ in want])


def test_compiled_values_are_used_and_a_failed_step_gives_zero_and_no_nan() -> None:
    """The penalty values of a small layout run as two generated kernels (actreg.compiled_values);
    a step with an infinite activation is skipped (``nonfinite="skip"``): penalty 0, no NaN in any
    gradient, counted; the steps around it equal ``fused=False``."""
    from actreg.compiled_values import ValueKernels

    class Spike(nn.Module):
        """``tanh(x)``, with ``inf`` at one position while ``spike`` is set (``where``: its gradient
        is finite, so any NaN in a gradient would come from the statistics)."""

        def __init__(self) -> None:
            super().__init__()
            self.spike = False

        def forward(self, x: Tensor) -> Tensor:
            at = torch.zeros_like(x, dtype=torch.bool)
            at[3, 0] = self.spike
            return torch.where(at, torch.inf, torch.tanh(x))

    def run(fused: bool) -> tuple[list[float], list[list[Tensor]], actreg.ActivityRegularizer]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(IN_FEATURES, 6), Spike(), nn.Linear(6, 2)).double()
        penalties = [actreg.L1(0.3), actreg.AR(0.2), actreg.KLSparsity(0.2, 0.1), actreg.DeCov(0.1)]
        reg = actreg.ActivityRegularizer(model, {"1": penalties}, fused=fused, nonfinite="skip")
        gen = torch.Generator().manual_seed(2)
        losses, grads = [], []
        for step in range(4):
            x = torch.randn(7, IN_FEATURES, generator=gen, dtype=torch.float64)
            model[1].spike = step == 2
            model.zero_grad()
            h = model[1](model[0](x))
            loss = reg.loss()
            (loss + 0.1 * h.nan_to_num(posinf=0.0).sum()).backward()
            losses.append(loss.item())
            grads.append([p.grad.clone() for p in model[0].parameters()])
        return losses, grads, reg

    lf, gf, reg = run(True)
    le, ge, _ = run(False)
    assert reg._evaluator is not None and isinstance(reg._evaluator[1]._compiled, ValueKernels)
    assert lf[2] == 0.0 and int(reg.metrics()["skipped_steps"]) == 1
    _same_steps(list(zip(lf, gf, strict=True)), list(zip(le, ge, strict=True)), finite=True)
    # the kernels on their own: a step buffer with an infinite Gram entry and ok False gives total
    # 0, ok' False and a zero gradient, NaN-free (the slot's own backward would hide a NaN here)
    evaluator = reg._evaluator[1]
    size = reg.layout.size
    gen = torch.Generator().manual_seed(3)
    for ok, spoil in ((True, False), (False, True), (False, False)):
        stats = torch.rand(size, generator=gen, dtype=torch.float64).add_(1.0)
        if spoil:
            stats[-2] = torch.inf  # (the block ends with its Gram matrix: an off-diagonal entry)
        stats.requires_grad_()
        flag = torch.tensor(ok)
        got = evaluator.compiled_total(stats, None, flag)
        assert got is not None
        total, good = got
        total.backward()
        assert bool(good) is ok
        if ok:
            want = stats.detach().clone().requires_grad_()
            evaluator.total(want, None, flag).backward()
            assert total.item() == pytest.approx(evaluator.total(want.detach(), None, flag).item(), rel=1e-12)
            torch.testing.assert_close(stats.grad, want.grad, rtol=1e-12, atol=1e-14)
        else:
            assert total.item() == 0.0 and not stats.grad.any() and torch.isfinite(stats.grad).all()


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
def test_kernel_sizes_never_collide_with_the_example_rows(masked: bool) -> None:
    """A 4-unit ``L1`` slot's block holds 7 values (count, Σ|x|, Σx², 4 active counts), as many as
    the 7 example rows a kernel is traced with: the kernels must still serve 12 and 6 rows (found
    by the soak with fused kernels: the backward kernel had taken the gradient's size for the
    rows'). Two ``L1`` on one slot make the values read it by a gather: compiled too. Every step
    equals ``fused=False``."""
    from actreg.compiled_values import ValueKernels

    def run(fused: bool) -> tuple[list[float], list[list[Tensor]], actreg.ActivityRegularizer]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(IN_FEATURES, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        reg = actreg.ActivityRegularizer(model, {"1": [actreg.L1(0.3), actreg.L1(0.1)]}, fused=fused)
        gen = torch.Generator().manual_seed(4)
        losses, grads = [], []
        for rows in (12, 12, 6, 12, 6):
            x = torch.randn(rows, IN_FEATURES, generator=gen, dtype=torch.float64)
            keep = torch.arange(rows) % 4 != 1
            model.zero_grad()
            with reg.mask(keep) if masked else contextlib.nullcontext():
                y = model(x)
            loss = reg.loss()
            (loss + 0.1 * y.sum()).backward()
            losses.append(loss.item())
            grads.append([p.grad.clone() for p in model.parameters()])
        return losses, grads, reg

    lf, gf, reg = run(True)
    le, ge, _ = run(False)
    assert reg._evaluator is not None and isinstance(reg._evaluator[1]._compiled, ValueKernels)
    assert reg.layout.specs[0] is not None and reg.layout.specs[0].size == 7
    _same_steps(list(zip(lf, gf, strict=True)), list(zip(le, ge, strict=True)))


def test_compiled_values_of_a_step_with_no_value_to_differentiate() -> None:
    """A first step in which the regularized module did not run has no value yet (the layout knows
    no size): the compiled values still build (a zero gradient, found by the soak with fused
    kernels: the backward's trace had nothing to differentiate) and warn nothing; the next steps
    equal ``fused=False``."""

    def run(fused: bool) -> list[float]:
        torch.manual_seed(0)
        model = nn.ModuleDict({"a": nn.Linear(IN_FEATURES, 3), "b": nn.Tanh()}).double()
        reg = actreg.ActivityRegularizer(model, {"b": actreg.L2(0.5)}, fused=fused)
        gen = torch.Generator().manual_seed(5)
        losses = []
        for step in range(4):
            x = torch.randn(6, IN_FEATURES, generator=gen, dtype=torch.float64)
            model.zero_grad()
            h = model["a"](x)
            if step > 0:
                h = model["b"](h)
            loss = reg.loss()
            (loss + h.sum()).backward()
            losses.append(loss.item())
        return losses

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = run(True)
    assert got[0] == 0.0
    assert got == pytest.approx(run(False), rel=1e-12)


def test_fast_path_under_activation_checkpointing() -> None:
    """Regularized modules inside ``checkpoint(..., use_reentrant=False)`` over 5 steps: the forward
    records through the fast path, the recomputation in backward through the full path (it records
    nothing), and every step's penalty and gradient equal ``fused=False``."""
    from torch.utils.checkpoint import checkpoint

    def run(fused: bool) -> tuple[list[tuple[float, list[Tensor]]], actreg.ActivityRegularizer]:
        torch.manual_seed(0)
        layers = (nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
        model = nn.Sequential(*layers).double()
        pens = {"1": actreg.L1(0.3), "3": [actreg.L2(0.2), actreg.AR(0.1)]}
        reg = actreg.ActivityRegularizer(model, pens, fused=fused)
        gen = torch.Generator().manual_seed(1)
        out = []
        for _ in range(5):
            x = torch.randn(10, 6, generator=gen, dtype=torch.float64)
            model.zero_grad()
            y = model[4](checkpoint(model[:4], x, use_reentrant=False))
            loss = reg.loss() + y.square().mean()
            loss.backward()
            out.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
        return out, reg

    got, reg = run(True)
    want, _ = run(False)
    assert sorted(reg.recorder._fast) == [0, 1]
    _same_steps(got, want)
