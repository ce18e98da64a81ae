"""torch.compile: a compiled model records every step, with eager's values and gradients.

The reference is float64 and independent of actreg: the model's layers applied by hand to a float64
copy of the compiled model's current parameters, the penalties written from their formulas
(``reference.direct``), gradients by autograd. Each step runs a new batch (the penalty must move
with it) of a new size (a recompile), under a padding mask. The default inductor backend needs a
C++ compiler; the other tests use cheaper backends, since whether the hooks run at all -- and
recompiles -- are decided by dynamo (graph capture and guards), before any backend.
"""

from __future__ import annotations

import shutil
import sys
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn

import actreg
import actreg.compiling
import reference
from problem import CASES, EXPERTS, HIDDEN, IN_FEATURES, TIME

#: the slots of problem.make_model and the problem's penalties on them (weights as in reference.direct)
SLOTS = {"1": ["L1", "VarianceFloor", "DeCov", "TAR"], "2": ["LoadBalance", "ZLoss"]}
#: batch sizes of the steps (none equal to a feature size: dynamo would give both one symbol)
SIZES = [7, 7, 11, 9]

needs_compiler = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler"
)


def make_model() -> nn.Sequential:
    """problem.make_model in float32: Linear(5, 6) -> Sigmoid ("1") -> Linear(6, 4) ("2")."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN), nn.Sigmoid(), nn.Linear(HIDDEN, EXPERTS))


def make_regularizer(model: nn.Module) -> actreg.ActivityRegularizer:
    penalties = {
        slot: [eval(CASES[name][0], vars(actreg)) for name in names] for slot, names in SLOTS.items()
    }
    return actreg.ActivityRegularizer(model, penalties)


def batch(step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(500 + step)
    n = SIZES[step % len(SIZES)]
    x = torch.randn(n, TIME, IN_FEATURES, generator=g) * 1.5
    mask = torch.rand(n, TIME, generator=g) > 0.3
    mask[0, :2] = True
    return x, mask


def expected(model: nn.Module, x: Tensor, mask: Tensor) -> tuple[float, list[Tensor]]:
    """float64 penalty (all slots) and its gradient w.r.t. ``model``'s current parameters."""
    w0, b0, w1, b1 = (p.detach().double().requires_grad_(True) for p in model.parameters())
    act = {"1": torch.sigmoid(x.double() @ w0.T + b0)}
    act["2"] = act["1"] @ w1.T + b1
    total = sum(reference.direct(name, act[slot], mask) for slot, names in SLOTS.items() for name in names)
    return total.item(), list(torch.autograd.grad(total, (w0, b0, w1, b1)))


def train_step(
    run: Callable[..., Tensor],
    model: nn.Module,
    reg: actreg.ActivityRegularizer,
    step: int,
    masked: bool = True,
) -> float:
    """One SGD step of ``run`` (compiled or not; ``run(x)`` under ``reg.mask``, or ``run(x, mask)`` if
    not ``masked``) with the penalty as the only loss, checked against the float64 reference on the
    parameters the step started from; returns the penalty."""
    x, mask = batch(step)
    value, grads = expected(model, x, mask)
    model.zero_grad()
    if masked:
        with reg.mask(mask):
            out = run(x)
    else:
        out = run(x, mask)
    loss = reg.loss()
    (loss + 0.0 * out.sum()).backward()
    assert loss.item() == pytest.approx(value, rel=1e-5), f"step {step}: penalty"
    for p, g in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad.double(), g, rtol=1e-4, atol=1e-6, msg=f"step {step}: gradient")
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.3 * p.grad
    return loss.item()


def frames_compiled() -> int:
    return torch._dynamo.utils.counters["frames"]["ok"]


@pytest.fixture
def fresh_dynamo(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """As in a new process: no compiled graphs, dynamo's default hook guards, actreg not yet seen."""
    torch._dynamo.reset()
    monkeypatch.setattr(actreg.compiling, "_guarded", False)
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):
        yield
    torch._dynamo.reset()


@needs_compiler
def test_inductor_dynamic_records_every_step_with_eager_values_and_gradients() -> None:
    """The default backend (inductor) with ``dynamic=True`` and the mask entered inside the compiled
    function (a mask set outside it is a constant-shaped tensor to dynamo: every new batch size
    would recompile): one graph for every batch size. The first step runs uncompiled: its hooks take
    another path (no agreed feature sizes or shifts yet), which would cost a second compilation
    (~40 s of C++ on a small machine); the aot_eager test below compiles from the first step."""
    torch._dynamo.reset()
    torch._inductor.config.compile_threads = 1  # no pool of compile workers on a small machine
    eager, model = make_model(), make_model()
    eager_reg, reg = make_regularizer(eager), make_regularizer(model)

    def forward(x: Tensor, mask: Tensor) -> Tensor:
        with reg.mask(mask):
            return model(x)

    compiled = torch.compile(forward, dynamic=True)
    values, frames = [], []
    for step in range(len(SIZES)):
        eager_value = train_step(eager, eager, eager_reg, step)
        values.append(train_step(compiled if step else forward, model, reg, step, masked=False))
        frames.append(frames_compiled())
        assert values[-1] == pytest.approx(eager_value, rel=1e-5), f"step {step}: compiled vs eager"
        assert reg.metrics()["1/count"] == int(batch(step)[1].sum())  # every kept position, once
    assert len(set(values)) == len(values), values  # the penalty moves with the batch
    assert frames[1] == frames[-1], f"batch sizes {SIZES} recompiled: frames {frames}"
    reg.remove()
    eager_reg.remove()


def test_recompiles_record_every_step_with_eager_values_and_gradients() -> None:
    """Compiled from the first step, static shapes, mask set outside the model: recompiled on the
    second step (the hooks' first-step path is gone) and on new batch sizes. Recompiles are dynamo's
    (capture and guards), so ``aot_eager`` checks them without inductor's C++ compilation."""
    torch._dynamo.reset()
    eager, model = make_model(), make_model()
    eager_reg, reg = make_regularizer(eager), make_regularizer(model)
    compiled = torch.compile(model, backend="aot_eager")
    values, frames = [], []
    for step in range(len(SIZES)):
        eager_value = train_step(eager, eager, eager_reg, step)
        values.append(train_step(compiled, model, reg, step))
        frames.append(frames_compiled())
        assert values[-1] == pytest.approx(eager_value, rel=1e-5), f"step {step}: compiled vs eager"
        assert reg.metrics()["1/count"] == int(batch(step)[1].sum())  # every kept position, once
    assert len(set(values)) == len(values), values  # the penalty moves with the batch
    assert frames[0] < frames[2] < frames[3], f"batch sizes {SIZES} should recompile: frames {frames}"
    reg.remove()
    eager_reg.remove()


def test_regularizer_built_after_a_compiled_call_records(fresh_dynamo: None) -> None:
    """The compiled model ran before the regularizer existed: its graph has no hooks, and dynamo does
    not guard on empty hook dictionaries. Without actreg's guard the penalty would be 0 forever."""
    model = make_model()
    run = torch.compile(model, backend="eager")
    run(batch(0)[0])
    reg = make_regularizer(model)
    values = [train_step(run, model, reg, step) for step in range(3)]
    assert len(set(values)) == 3 and min(values) > 0
    reg.remove()
    # a new regularizer on other slots of the same compiled model (the removed hooks must not run)
    reg = actreg.ActivityRegularizer(model, {"2": actreg.L2(1.0)})
    x = batch(1)[0]
    out = run(x)
    assert reg.loss().item() == pytest.approx(out.double().pow(2).sum(-1).mean().item(), rel=1e-6)
    reg.remove()


def test_same_architecture_compiled_earlier_is_not_reused_without_hooks(fresh_dynamo: None) -> None:
    """Another model of the same architecture (an evaluation copy, a baseline) was compiled first.
    dynamo shares graphs between modules of one structure: without actreg's guard the regularized
    model would run that graph, which has no hooks, and its penalty would silently be 0."""
    other = make_model()
    torch.compile(other, backend="eager")(batch(0)[0])
    model = make_model()
    reg = make_regularizer(model)
    run = torch.compile(model, backend="eager")
    values = [train_step(run, model, reg, step) for step in range(3)]
    assert len(set(values)) == 3 and min(values) > 0
    reg.remove()


def test_dynamo_loaded_after_the_regularizer_guards_from_the_next_step(
    fresh_dynamo: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """actreg never imports dynamo itself; built before it is loaded, it turns the guards on at the first
    ``loss()``. The one case that loses a step: a same-architecture model compiled before the
    regularized one, after the regularizer was built -- from the second step on it records."""
    model = make_model()
    with monkeypatch.context() as m:
        m.delitem(sys.modules, "torch._dynamo")  # as if nothing had loaded dynamo yet
        reg = make_regularizer(model)
    assert not actreg.compiling.hooks_guarded()
    torch.compile(make_model(), backend="eager")(batch(0)[0])
    run = torch.compile(model, backend="eager")
    with reg.mask(batch(0)[1]):
        run(batch(0)[0])
    reg.loss()  # the documented lost step (the graph without hooks ran); guards on, caches reset
    assert actreg.compiling.hooks_guarded() and not torch._dynamo.config.skip_nnmodule_hook_guards
    values = [train_step(run, model, reg, step) for step in range(1, 3)]
    assert values[0] != values[1] and min(values) > 0
    reg.remove()


def test_building_a_regularizer_leaves_other_compiled_code_and_callbacks_alone(fresh_dynamo: None) -> None:
    """Graphs compiled before the regularizer existed are refused for its modules only. Everything
    else compiled in the process -- a function, the unregularized copy of the same architecture --
    keeps its graph (its backend is not called again), and a callback registered with
    ``torch._dynamo.callback`` stays registered and sees the regularized model's new compilation.
    (It used to reset dynamo: everything recompiled, and the callbacks were dropped.)"""
    compiles: Counter[str] = Counter()
    starts: list[object] = []

    def counting(name: str) -> Callable[..., Callable[..., object]]:
        def backend(gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Callable[..., object]:
            compiles[name] += 1
            return gm.forward

        return backend

    def on_start(args: object) -> None:
        starts.append(args)

    torch._dynamo.callback.on_compile_start(on_start)  # (fresh_dynamo's reset removes it)
    x = batch(0)[0]
    function = torch.compile(lambda t: torch.sin(t) * 2, backend=counting("function"))
    copy, model = make_model(), make_model()  # copy: same architecture, not regularized
    run_copy = torch.compile(copy, backend=counting("copy"))
    run = torch.compile(model, backend=counting("model"))
    expected = {"function": function(x), "copy": run_copy(x).detach()}
    run(x)
    assert compiles == {"function": 1, "copy": 1, "model": 1} and len(starts) == 3, (compiles, starts)
    reg = make_regularizer(model)
    values = [train_step(run, model, reg, step) for step in range(2)]  # checked against float64
    assert min(values) > 0 and values[0] != values[1]
    assert compiles["model"] > 1 and len(starts) == 2 + compiles["model"]  # recompiled, seen
    torch.testing.assert_close(function(x), expected["function"], rtol=0, atol=0)
    torch.testing.assert_close(run_copy(x), expected["copy"], rtol=0, atol=0)
    assert (compiles["function"], compiles["copy"]) == (1, 1), compiles  # not compiled again
    assert reg.metrics()["1/count"] == int(batch(1)[1].sum())
    reg.remove()


def test_without_a_readable_dynamo_cache_the_regularizer_resets_dynamo(
    fresh_dynamo: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fallback for a torch whose compile cache cannot be guarded graph by graph: dynamo's reset
    (every graph compiled again), so that no graph without the hooks runs a regularized module."""
    monkeypatch.setattr(actreg.compiling, "_refuse_hooked", lambda: False)
    resets: list[None] = []
    reset = torch._dynamo.reset
    monkeypatch.setattr(torch._dynamo, "reset", lambda: (resets.append(None), reset())[1])
    model = make_model()
    run = torch.compile(model, backend="eager")
    run(batch(0)[0])
    reg = make_regularizer(model)
    assert len(resets) == 1
    values = [train_step(run, model, reg, step) for step in range(2)]
    assert min(values) > 0 and values[0] != values[1]
    reg.remove()


def test_no_graph_break_from_any_builtin_penalty_or_mask() -> None:
    """``torch._dynamo.explain``: every built-in penalty, a padding mask set outside the compiled model
    and one set inside a compiled function -- one graph, no break. (Recording is the same in every
    ``sync`` mode.)"""
    model = make_model()
    penalties = {"1": [eval(CASES[n][0], vars(actreg)) for n in CASES if CASES[n][1] == "1"]}
    penalties["2"] = [eval(CASES[n][0], vars(actreg)) for n in CASES if CASES[n][1] == "2"]
    reg = actreg.ActivityRegularizer(model, penalties)
    x, mask = batch(0)
    with reg.mask(mask):
        model(x)
    reg.loss().backward()  # shifts of the centred slots exist from now on

    def forward(x: Tensor, mask: Tensor) -> Tensor:
        with reg.mask(mask):
            return model(x)

    torch._dynamo.reset()
    with reg.mask(mask):
        outside = torch._dynamo.explain(model)(x)
    inside = torch._dynamo.explain(forward)(x, mask)
    for explained in (outside, inside):
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), [
            str(b.reason)[:300] for b in explained.break_reasons
        ]
    assert reg.loss().item() > 0 and reg.metrics()["1/count"] == 2 * int(mask.sum())  # both recorded
    reg.remove()
