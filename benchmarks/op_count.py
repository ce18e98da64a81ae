"""Top-level aten ops that actreg adds per regularized layer per training step (an op budget).

    python benchmarks/op_count.py [--config L1 ...] [--width 512] [--batch 128] [--by-name]

Definition (deterministic: it counts dispatched ops, it does not time them):

- The eager statistics (``fused=False``): the ops Python and autograd dispatch, also what runs
  wherever no fused kernel can be compiled (a fused kernel is one call whatever it computes).
- Model: an MLP of ``L`` hidden layers, ``nn.Sequential(Linear(w, w), ReLU(), ..., Linear(w, 10))``,
  float32, batch ``128``, one process (no process group). The regularized layers are the ReLU
  outputs (modules ``"1"``, ``"3"``, ...): ``penalties = {str(2 * i + 1): penalty for i in range(L)}``,
  ``sync="global"`` (a single rank without a process group).
- One step, in three profiled phases: ``forward`` (``out = model(x)``), ``loss``
  (``cross_entropy(out, y) + reg.loss()``) and ``backward`` (``loss.backward()``, then, for
  configurations with an ``ExpertBias``, ``reg.update_bias()``: every step is an optimizer step).
  Gradients are set to ``None`` before each step, outside the phases. The baseline is the same model and task
  loss without actreg.
- An op counts if it is a ``torch.profiler`` CPU event named ``aten::*`` none of whose ancestors in
  the event tree is an ``aten::`` op (a *top-level* op: what Python code or the autograd engine
  dispatched, not what an op runs inside). Ops that the autograd engine runs in backward are
  children of ``autograd::engine::evaluate_function: ...`` / ``*Backward0`` events, which are not
  aten ops, so they count. Collectives (``c10d::*``) and anything inside them are excluded, and so
  are profiler and ``record_function`` events themselves (they are not ``aten::`` ops).
- 3 warm-up steps, then 2 profiled steps whose counts must be equal (else ``RuntimeError``).
- ``added(L) = ops(actreg) - ops(baseline)``, measured at ``L`` in {1, 2, 4, 8}.
  ``per_layer = (added(8) - added(4)) / 4`` and ``fixed = added(4) - 4 * per_layer`` (the step's
  part that does not grow with layers: packing, the collective, decisions); a least-squares fit
  over all four ``L`` is reported next to it, and a non-zero residual means the cost is not linear
  in ``L``.

The width does not change the counts (the default width of the test is 64, to be fast). The
committed budgets are ``BUDGETS`` (per layer) and ``FIXED_BUDGET`` (the fixed part of every
configuration); ``tests/test_op_budget.py`` asserts them. ``main()`` exits with status 1 when a
configuration is over budget.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

import actreg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import build

PenaltySpec = actreg.Penalty | list[actreg.Penalty]

CONFIGS: dict[str, Callable[[int], PenaltySpec]] = {
    "L1": lambda d: actreg.L1(1e-4),
    "L2": lambda d: actreg.L2(1e-4),
    "AR": lambda d: actreg.AR(1e-4),
    "L1+DeCov": lambda d: [actreg.L1(1e-4), actreg.DeCov(1e-4)],
    "VarianceFloor": lambda d: actreg.VarianceFloor(1.0),
    # routers: the layer's d outputs are taken as the logits of d experts
    "LoadBalance": lambda d: actreg.LoadBalance(d, 2, 1e-2),
    "LoadBalance-sigmoid": lambda d: actreg.LoadBalance(d, 2, 1e-2, score="sigmoid"),
    "SequenceBalance": lambda d: actreg.SequenceBalance(d, 2, 1e-4, SEQUENCES),
    "SequenceBalance-sigmoid": lambda d: actreg.SequenceBalance(d, 2, 1e-4, SEQUENCES, score="sigmoid"),
    "ExpertBias": lambda d: actreg.ExpertBias(d, 2),
    "ExpertBias+LoadBalance": lambda d: [actreg.ExpertBias(d, 2), actreg.LoadBalance(d, 2, 1e-2)],
}
"""Penalty of every regularized layer of width ``d``, by configuration name (a fresh instance per layer)."""

SEQUENCES = 8
"""``SequenceBalance`` configurations: the batch is ``SEQUENCES`` sequences of ``batch / SEQUENCES``
positions; their layers are fed by ``reg.observe(name, output, sequence=ids)`` from a forward hook
(sequence indices do not reach module hooks), ``ids`` each position's sequence."""

BUDGETS: dict[str, int] = {
    "L1": 16,
    "L2": 16,
    "AR": 16,
    "L1+DeCov": 36,
    "VarianceFloor": 32,
    "LoadBalance": 40,
    "LoadBalance-sigmoid": 42,
    "SequenceBalance": 58,  # issue 13: at most 2x LoadBalance's (tests/test_moe.py checks the ratio)
    "SequenceBalance-sigmoid": 60,
    "ExpertBias": 24,  # the biased top-k and its counts (no loss)
    "ExpertBias+LoadBalance": 56,
}
"""Committed budget: top-level aten ops added per regularized layer per step."""

FIXED_BUDGET = 30
"""Committed budget: the step's fixed part -- pack, collective, decisions (and the centring shifts)
-- in top-level aten ops per step, whatever the number of layers."""

VALUE_BUDGETS: dict[str, int] = {
    "L1": 16,
    "L2": 16,
    "AR": 17,
    "L1+DeCov": 52,
    "VarianceFloor": 55,
    "LoadBalance": 28,
    "LoadBalance-sigmoid": 28,
    "SequenceBalance": 36,
    "SequenceBalance-sigmoid": 36,
    "ExpertBias": 6,
    "ExpertBias+LoadBalance": 32,
}
"""Committed budget: ops of the penalty values (forward + backward), evaluated once per *kind* of
penalty for all layers together; also independent of the number of layers."""

PHASES = ("forward", "loss", "backward")
LAYERS = (1, 2, 4, 8)
WARMUP_STEPS = 3
PROFILED_STEPS = 2
_MARK = "op_count::"

OpCounts = dict[str, Counter[str]]  # phase -> op name -> count


def build_model(layers: int, width: int) -> nn.Sequential:
    """``Linear(w, w), ReLU()`` repeated ``layers`` times, then ``Linear(w, 10)``; float32, seed 0."""
    return build(layers, width)  # the model of bench_step.py


def penalties(config: str, layers: int, width: int = 512) -> dict[str, PenaltySpec]:
    """The penalties dict of ``config``: every ReLU output (``"1"``, ``"3"``, ...) regularized."""
    if config not in CONFIGS:
        raise ValueError(f"unknown config {config!r}; known: {list(CONFIGS)}")
    return {str(2 * i + 1): CONFIGS[config](width) for i in range(layers)}


def regularize(
    model: nn.Sequential, config: str, layers: int, width: int, batch: int
) -> tuple[actreg.ActivityRegularizer, Callable[[], None]]:
    """``config``'s regularizer on ``model`` (``sync="global"``) and what removes it.

    ``SequenceBalance`` layers are observed names fed by a forward hook on each layer with every
    position's sequence index (``SEQUENCES`` contiguous sequences).
    """
    spec = penalties(config, layers, width)
    if not config.startswith("SequenceBalance"):
        reg = actreg.ActivityRegularizer(model, spec, sync="global", fused=False)
        return reg, reg.remove
    reg = actreg.ActivityRegularizer(model, spec, sync="global", observed=list(spec), fused=False)
    ids = torch.arange(batch) * SEQUENCES // batch

    def feed(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            reg.observe(name, output, sequence=ids)

        return hook

    handles = [model.get_submodule(name).register_forward_hook(feed(name)) for name in spec]

    def remove() -> None:
        for h in handles:
            h.remove()
        reg.remove()

    return reg, remove


@dataclass(frozen=True)
class Event:
    """One CPU profiler event: name, thread, start and end (ns), and whether it is top level."""

    name: str
    thread: int
    start: int
    end: int
    top_level: bool  # an ``aten::`` op with no ``aten::``/``c10d::`` ancestor


def _inside_op(name: str) -> bool:
    return name.startswith(("aten::", "c10d::"))


def events_of(prof: profile) -> list[Event]:
    """The synchronous CPU events of ``prof``, each marked top level or not.

    The event tree is rebuilt from the raw kineto events the way ``prof.events()`` builds it
    (per thread, sorted by ``(start, -end)``, nesting by interval containment) -- but in one pass
    without ``FunctionEvent`` objects, which is ~10x faster; ``top_level_names_via_events`` is the
    reference it is checked against in ``tests/test_op_budget.py``.
    """
    raw = [
        (e.start_thread_id(), e.start_ns(), e.end_ns(), e.name())
        for e in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        if e.device_type() == torch.autograd.DeviceType.CPU and not e.is_async()
    ]
    raw.sort(key=lambda r: (r[0], r[1], -r[2]))
    out: list[Event] = []
    stack: list[tuple[int, bool]] = []  # (end, inside an aten::/c10d:: op) of the open events
    thread = None
    for tid, start, end, name in raw:
        if tid != thread:
            thread, stack = tid, []
        while stack and (start >= stack[-1][0] or end > stack[-1][0]):
            stack.pop()
        inside = bool(stack) and stack[-1][1]
        out.append(Event(name, tid, start, end, name.startswith("aten::") and not inside))
        stack.append((end, inside or _inside_op(name)))
    return out


def top_level_names_via_events(prof: profile) -> Counter[str]:
    """Top-level op names from ``prof.events()``'s ``cpu_parent`` chains (slow; the reference)."""
    names: Counter[str] = Counter()
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        parent, inside = e.cpu_parent, False
        while parent is not None and not inside:
            inside, parent = _inside_op(parent.name), parent.cpu_parent
        if not inside:
            names[e.name] += 1
    return names


def _phase_counts(events: Sequence[Event], step: int) -> OpCounts:
    """Top-level op names per phase of profiled step ``step``, by the phases' marker intervals.

    Intervals (not tree ancestry) assign an op to a phase, so that ops the autograd engine would
    run on another thread than the caller's are still counted in ``backward``.
    """
    spans: dict[str, tuple[int, int]] = {}
    for e in events:
        if e.name.startswith(f"{_MARK}{step}::"):
            spans[e.name.rsplit("::", 1)[1]] = (e.start, e.end)
    missing = set(PHASES) - set(spans)
    if missing:
        raise RuntimeError(f"profiler markers of phases {sorted(missing)} not found in step {step}")
    counts: OpCounts = {phase: Counter() for phase in PHASES}
    for op in events:
        if op.top_level:
            for phase, (start, end) in spans.items():
                if start <= op.start <= end:
                    counts[phase][op.name] += 1
                    break
    return counts


def _profile(
    model: nn.Module, reg: actreg.ActivityRegularizer | None, batch: int, width: int
) -> tuple[OpCounts, profile]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, width, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)

    def step(i: int | None) -> None:
        def mark(phase: str) -> Any:
            return record_function(f"{_MARK}{i}::{phase}") if i is not None else contextlib.nullcontext()

        model.zero_grad(set_to_none=True)
        with mark("forward"):
            out = model(x)
        with mark("loss"):
            loss = nn.functional.cross_entropy(out, y)
            if reg is not None:
                loss = loss + reg.loss()
        with mark("backward"):
            loss.backward()
            if reg is not None and reg.biases:  # ExpertBias: the update of an optimizer step
                reg.update_bias()

    for _ in range(WARMUP_STEPS):
        step(None)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(PROFILED_STEPS):
            step(i)
    events = events_of(prof)
    per_step = [_phase_counts(events, i) for i in range(PROFILED_STEPS)]
    for i, other in enumerate(per_step[1:], start=1):
        if other != per_step[0]:
            diff = {p: dict((other[p] - per_step[0][p]) + (per_step[0][p] - other[p])) for p in PHASES}
            raise RuntimeError(f"op counts differ between profiled steps 0 and {i}: {diff}")
    return per_step[0], prof


def profile_step(
    config: str | None, layers: int, width: int = 512, batch: int = 128
) -> tuple[OpCounts, profile]:
    """Op counts of one step (``config=None``: the baseline) and the profile they came from."""
    model = build_model(layers, width)
    if config is None:
        return _profile(model, None, batch, width)
    reg, remove = regularize(model, config, layers, width, batch)
    try:
        return _profile(model, reg, batch, width)
    finally:
        remove()


def value_ops(config: str, layers: int, width: int = 512, batch: int = 128) -> int:
    """Top-level ops of evaluating every penalty's value from the step buffer, forward + backward.

    Measured in isolation on the regularizer's own evaluator after two warm-up steps (the initial
    gradient of ``backward()`` is not counted). It is part of the fixed part of a step: every slot
    with the same kind of penalty is evaluated in the same ops.
    """
    model = build_model(layers, width)
    reg, remove = regularize(model, config, layers, width, batch)
    try:
        x = torch.randn(batch, width, generator=torch.Generator().manual_seed(0))
        for _ in range(2):
            model(x)
            loss = reg.loss()
            if loss.requires_grad:  # (ExpertBias alone: no loss, nothing to differentiate)
                loss.backward()
        assert reg._last is not None
        wire = reg._last[0].clone().requires_grad_(True)
        evaluator = reg._values(wire.dtype, wire.device)
        total = evaluator.total(wire, None)
        grad = torch.ones_like(total)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            again = evaluator.total(wire, None)
            if again.requires_grad:  # (ExpertBias alone: a constant 0, no backward)
                again.backward(grad)
        return sum(e.top_level for e in events_of(prof))
    finally:
        remove()


@cache
def _measure(config: str | None, layers: int, width: int, batch: int) -> OpCounts:
    """Op counts of one step; ``config=None`` is the baseline (no actreg). Cached."""
    return profile_step(config, layers, width, batch)[0]


def _totals(counts: OpCounts) -> dict[str, int]:
    out = {phase: sum(counts[phase].values()) for phase in PHASES}
    out["total"] = sum(out.values())
    return out


def _difference(a: OpCounts, b: OpCounts) -> dict[str, dict[str, int]]:
    """``a - b`` per op name and phase (may be negative): name -> phase/total -> count."""
    names = sorted({n for p in PHASES for n in (*a[p], *b[p])})
    out: dict[str, dict[str, int]] = {}
    for name in names:
        row = {phase: a[phase][name] - b[phase][name] for phase in PHASES}
        row["total"] = sum(row.values())
        if any(row.values()):
            out[name] = row
    return out


def count(config: str, layers: int, width: int = 512, batch: int = 128) -> dict[str, Any]:
    """Top-level aten ops of one step of ``config`` with ``layers`` regularized layers.

    Returns ``{"baseline": {...}, "actreg": {...}, "added": {...}, "added_by_name": {...}}``: the
    first three map ``"forward"``, ``"loss"``, ``"backward"`` and ``"total"`` to op counts
    (``added = actreg - baseline``); ``added_by_name`` maps an op name to the same four keys.
    """
    base = _measure(None, layers, width, batch)
    ours = _measure(config, layers, width, batch)
    baseline, with_reg = _totals(base), _totals(ours)
    return {
        "baseline": baseline,
        "actreg": with_reg,
        "added": {k: with_reg[k] - baseline[k] for k in with_reg},
        "added_by_name": _difference(ours, base),
    }


@dataclass
class Fit:
    """``added(L) = fixed + per_layer * L`` of one configuration, per phase and in total."""

    config: str
    per_layer: dict[str, float]  # phase/"total" -> slope from L=8 vs L=4
    fixed: dict[str, float]  # phase/"total" -> intercept through L=4
    lstsq: tuple[float, float]  # (per_layer, fixed) of the least-squares fit of the totals
    max_residual: float  # largest |added(L) - fit(L)| of the totals over LAYERS (0: linear)
    added: dict[int, dict[str, int]]  # L -> phase/"total" -> added ops
    per_layer_by_name: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> phase -> ops/layer
    added_by_name_at_8: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> phase -> ops at L=8
    values: dict[int, int] = field(default_factory=dict)  # L -> ops of the penalty values

    @property
    def value_ops(self) -> int:
        return max(self.values.values()) if self.values else 0

    @property
    def infrastructure(self) -> float:
        """The fixed part without the penalty values: pack, collective, decisions, shifts."""
        return self.fixed["total"] - self.value_ops

    @property
    def ok(self) -> bool:
        return (
            self.per_layer["total"] <= BUDGETS[self.config]
            and self.infrastructure <= FIXED_BUDGET
            and self.value_ops <= VALUE_BUDGETS[self.config]
            and len(set(self.values.values())) <= 1
        )

    def by_name_table(self, top: int = 15) -> str:
        """Markdown: the ``top`` op names by added ops per layer (then by added ops at L=8)."""
        names = sorted(
            set(self.per_layer_by_name) | set(self.added_by_name_at_8),
            key=lambda n: (
                -self.per_layer_by_name.get(n, {}).get("total", 0.0),
                -self.added_by_name_at_8.get(n, {}).get("total", 0),
                n,
            ),
        )
        lines = [
            f"{self.config}: top {top} op names, added per layer (forward / loss / backward = total) "
            "and added at L=8",
            "",
            "| op | per layer: forward | loss | backward | total | added at L=8 |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name in names[:top]:
            pl = self.per_layer_by_name.get(name, {})
            at8 = self.added_by_name_at_8.get(name, {}).get("total", 0)
            cells = " | ".join(_num(pl.get(k, 0.0)) for k in (*PHASES, "total"))
            lines.append(f"| `{name}` | {cells} | {at8} |")
        return "\n".join(lines)


def _num(x: float) -> str:
    return f"{x:g}"


def fit_details(config: str, width: int = 512, batch: int = 128) -> Fit:
    """Measure ``config`` at every ``L`` in ``LAYERS`` and fit ``added(L) = fixed + per_layer * L``."""
    runs = {n: count(config, n, width, batch) for n in LAYERS}
    added = {n: r["added"] for n, r in runs.items()}
    keys = (*PHASES, "total")
    per_layer = {k: (added[8][k] - added[4][k]) / 4 for k in keys}
    fixed = {k: added[4][k] - 4 * per_layer[k] for k in keys}

    xs = [float(n) for n in LAYERS]
    ys = [float(added[n]["total"]) for n in LAYERS]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    intercept = my - slope * mx
    residual = max(abs(y - (intercept + slope * x)) for x, y in zip(xs, ys, strict=True))

    by8, by4 = runs[8]["added_by_name"], runs[4]["added_by_name"]
    by_name: dict[str, dict[str, float]] = {}
    for name in set(by8) | set(by4):
        row = {k: (by8.get(name, {}).get(k, 0) - by4.get(name, {}).get(k, 0)) / 4 for k in keys}
        if any(row.values()):
            by_name[name] = row
    return Fit(
        config=config,
        per_layer=per_layer,
        fixed=fixed,
        lstsq=(slope, intercept),
        max_residual=residual,
        added=added,
        per_layer_by_name=by_name,
        added_by_name_at_8=by8,
        values={n: value_ops(config, n, width, batch) for n in (1, 8)},
    )


def fit(config: str, width: int = 512, batch: int = 128) -> tuple[float, float]:
    """``(per_layer, fixed)`` added top-level ops of ``config`` (slope of L=8 vs L=4, intercept)."""
    f = fit_details(config, width, batch)
    return f.per_layer["total"], f.fixed["total"]


def table(fits: Sequence[Fit]) -> str:
    """Markdown table: config | per-layer ops | fixed ops | budget | OK?."""
    lines = [
        "| config | per-layer ops (forward / loss / backward = total) | least squares (per layer, fixed) "
        "| fixed ops = infrastructure + values | budget (per layer; infrastructure, values) | OK? |",
        "| --- | ---: | ---: | ---: | ---: | :---: |",
    ]
    for f in fits:
        pl = f.per_layer
        phases = " / ".join(_num(pl[k]) for k in PHASES)
        split = f"{phases} = **{_num(pl['total'])}**"
        lsq = f"{f.lstsq[0]:.2f}, {f.lstsq[1]:.2f}" + (
            f" (max residual {f.max_residual:.2f})" if f.max_residual > 1e-9 else ""
        )
        budget = f"≤ {BUDGETS[f.config]}; ≤ {FIXED_BUDGET}, ≤ {VALUE_BUDGETS[f.config]}"
        fixed = f"{_num(f.fixed['total'])} = {_num(f.infrastructure)} + {f.value_ops}"
        lines.append(f"| {f.config} | {split} | {lsq} | {fixed} | {budget} | {'yes' if f.ok else '**no**'} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--by-name", action="store_true", help="top 15 op names per layer, per config")
    args = p.parse_args(argv)
    fits = [fit_details(c, args.width, args.batch) for c in args.config]
    base = {n: _totals(_measure(None, n, args.width, args.batch))["total"] for n in LAYERS}
    print(
        f"Top-level aten ops added per step by actreg, MLP width {args.width}, batch {args.batch}, "
        f"L in {list(LAYERS)}, torch {torch.__version__}; baseline step: "
        + ", ".join(f"L={n}: {t}" for n, t in base.items())
        + "\n"
    )
    print(table(fits))
    if args.by_name:
        for f in fits:
            print()
            print(f.by_name_table())
    return 0 if all(f.ok for f in fits) else 1


if __name__ == "__main__":
    sys.exit(main())
