"""Step time and collectives per step, in interleaved paired rounds: actreg vs. no penalty vs. naive.

    python benchmarks/bench_step.py                                  # the issue's targets (defaults below)
    python benchmarks/bench_step.py --all --json runs/bench.json     # + global-L1+VF, raw round times
    python benchmarks/bench_step.py --rounds 2 --steps-per-round 3 --width 64    # smoke test, seconds
    python benchmarks/bench_step.py --single [--compile]            # one process: L1 and DeCov vs none

    [--nproc 2] [--layers 8] [--width 512] [--batch 128] [--rounds 20] [--steps-per-round 10]
    [--warmup 5] [--all] [--json PATH] [--single [--compile] [--threads 1] [--penalties L1,DeCov]]

``--single``: one process, no process group (what a new user tries first). Variants ``none``,
``L1`` (``actreg.L1(1e-4)`` on every ReLU) and ``DeCov`` (``actreg.DeCov(1e-4)``), each with its own
model copy and SGD optimizer, ``sync="global"`` (a single rank: no collective). With ``--compile``
every variant's model (``none`` too) is ``torch.compile``-d (inductor, default settings) and the
first steps' time, compile included, is reported per variant. ``--threads`` torch threads
(default 1, so that background load on a shared machine disturbs less); ``--clock thread`` times the
rounds by this thread's CPU time instead of the wall clock (the time a loaded machine keeps the
process waiting for a core is left out; contention for caches and memory is not). Rounds, paired ratios and
the order rotation are as below; the warm-up runs ``max(--warmup, 3)`` steps (compiled models
recompile on the second step, when the hooks leave their first-step path).

Each of ``--nproc`` gloo ranks (spawned, one thread each) trains, under DDP with SGD and
cross-entropy, an MLP of ``--layers`` hidden ``Linear(width, width) + ReLU`` then
``Linear(width, 10)``, on ``--batch`` samples per rank. The regularized layers are the ReLU outputs.
Variants, each with its own model copy, DDP wrapper and optimizer, all built once per rank:

- ``none``: no penalty (the floor);
- ``global-L1``: ``actreg.L1(1e-4)`` on every layer, ``sync="global"`` (one all_reduce per step);
- ``local-L1``: the same with ``sync="local"`` (per-worker statistics, no communication);
- ``naive-L1``: forward hooks that ``torch.distributed.nn.functional.all_reduce`` each layer's L1
  statistics (abs sum, count) — differentiable, so it communicates again in backward: the
  "all_reduce per layer" approach actreg replaces;
- ``global-DeCov``: ``actreg.DeCov(1e-4)`` on every layer, ``sync="global"``;
- ``global-L1+VF`` (``--all`` only): ``[actreg.L1(1e-4), actreg.VarianceFloor(1.0)]``, ``sync="global"``.

After ``--warmup`` steps per variant, each round runs ``--steps-per-round`` steps of every variant
(order rotated by one each round to remove order bias), timed between two ``dist.barrier()`` calls
with ``time.perf_counter``. Per variant: the median over rounds of the per-step time, and the median
(with interquartile range) of the paired ratio ``round_time(variant) / round_time(none)`` of the
same round. Collectives are counted (``c10d::`` profiler events) in one step per variant, minus those
of ``none`` (DDP's own gradient all_reduce).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import queue
import socket
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dnn
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.profiler import ProfilerActivity, profile

import actreg

VARIANTS = ["none", "global-L1", "local-L1", "naive-L1", "global-DeCov"]
EXTRA_VARIANTS = ["global-L1+VF"]
WEIGHT = 1e-4
# the targets: printed next to the measurements, not asserted
TARGET_GLOBAL_L1 = 1.05  # global-L1 step time / none
TARGET_NAIVE_OVER_ACTREG = 5.0  # (naive-L1 ratio - 1) / (global-L1 ratio - 1)
TARGET_GLOBAL_DECOV = 2.5  # global-DeCov step time / none


def build(layers: int, width: int) -> nn.Sequential:
    """``layers`` x (Linear(width, width) + ReLU), then Linear(width, 10); same weights every call."""
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.ReLU()]
    mods.append(nn.Linear(width, 10))
    return nn.Sequential(*mods)


def relu_names(layers: int) -> list[str]:
    """Module names of the ReLU outputs in :func:`build`'s Sequential."""
    return [str(2 * i + 1) for i in range(layers)]


class HookTerms:
    """Penalty terms appended by forward hooks, summed (and cleared) by :meth:`loss`."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.terms: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        raise NotImplementedError

    def loss(self) -> torch.Tensor:
        total = torch.stack(self.terms).sum() if self.terms else torch.zeros(())
        self.terms = []
        return total

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class NaiveL1(HookTerms):
    """L1 on global-batch statistics with one differentiable all_reduce per statistic per layer.

    The forward hook of every regularized layer all-reduces its ``sum |x|`` (differentiable: its
    backward all-reduces the gradient again) and its position count; the penalty is
    ``weight * global_abs_sum / global_count`` per layer. Gradient scale is not corrected (W times
    too large after DDP's averaging); irrelevant for timing.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], weight: float) -> None:
        self.weight = weight
        modules = dict(model.named_modules())
        super().__init__([modules[n] for n in names])

    def _hook(self, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        if not torch.is_grad_enabled():
            return
        abs_sum = dnn.all_reduce(out.abs().sum())
        count = dnn.all_reduce(torch.tensor(float(out[..., 0].numel()), dtype=out.dtype))
        self.terms.append(self.weight * abs_sum / count)


#: the penalty of each kind of variant, built once per regularized layer
PENALTIES: dict[str, Callable[[], Any]] = {
    "L1": lambda: actreg.L1(WEIGHT),
    "DeCov": lambda: actreg.DeCov(WEIGHT),
    "L1+VF": lambda: [actreg.L1(WEIGHT), actreg.VarianceFloor(1.0)],
}


class Trained:
    """A model (``net``), its optimizer and its regularizer (``None``: no penalty): one step."""

    net: Callable[[torch.Tensor], torch.Tensor]
    opt: torch.optim.Optimizer
    reg: Any

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        loss = nn.functional.cross_entropy(self.net(x), y)
        if self.reg is not None:
            loss = loss + self.reg.loss()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


class Variant(Trained):
    """One variant on one rank: its own model copy, DDP wrapper, optimizer and regularizer."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name = name
        self.model = build(args.layers, args.width)
        self.net = DDP(self.model)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=1e-3)
        names = relu_names(args.layers)
        self.reg: Any = None
        if name == "naive-L1":
            self.reg = NaiveL1(self.model, names, WEIGHT)
        elif name != "none":
            sync, kind = name.split("-", 1)
            penalties = {n: PENALTIES[kind]() for n in names}
            self.reg = actreg.ActivityRegularizer(self.net, penalties, sync=sync)


    def remove(self) -> None:
        if self.reg is not None:
            self.reg.remove()


def count_collectives(variant: Variant, x: torch.Tensor, y: torch.Tensor) -> int:
    """``c10d::`` events (collectives issued through the dispatcher) in one profiled step."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        variant.step(x, y)
    return sum(1 for e in prof.events() if e.name.startswith("c10d::"))


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: Any) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    # the naive variant uses the differentiable all_reduce on purpose (deprecated since torch 2.x)
    warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    names = VARIANTS + (EXTRA_VARIANTS if args.all else [])
    variants = [Variant(n, args) for n in names]
    gen = torch.Generator().manual_seed(1000 + rank)
    # a fixed pool of batches, generated outside the timed region and shared by every variant
    xs = [torch.randn(args.batch, args.width, generator=gen) for _ in range(4)]
    pool = [(x, torch.randint(0, 10, (args.batch,), generator=gen)) for x in xs]
    for v in variants:
        for i in range(args.warmup):
            v.step(*pool[i % len(pool)])
    collectives = {v.name: count_collectives(v, *pool[0]) for v in variants}

    rounds: dict[str, list[float]] = {v.name: [] for v in variants}
    orders: list[list[str]] = []
    for r in range(args.rounds):
        k = r % len(variants)
        order = variants[k:] + variants[:k]
        orders.append([v.name for v in order])
        for v in order:
            dist.barrier()
            t0 = time.perf_counter()
            for i in range(args.steps_per_round):
                v.step(*pool[i % len(pool)])
            dist.barrier()
            rounds[v.name].append((time.perf_counter() - t0) / args.steps_per_round)
    for v in variants:
        v.remove()

    per_rank: list[Any] = [None] * world
    dist.all_gather_object(per_rank, rounds)
    if rank == 0:
        out.put({"collectives": collectives, "orders": orders, "round_s": per_rank})
    dist.destroy_process_group()


SINGLE_VARIANTS = ["none", "L1", "DeCov"]


class SingleVariant(Trained):
    """One variant of ``--single``: model copy, optional ``torch.compile``, optimizer, regularizer."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name = name
        self.model = build(args.layers, args.width)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.reg: Any = None
        if name != "none":
            penalties = {n: PENALTIES[name]() for n in relu_names(args.layers)}
            self.reg = actreg.ActivityRegularizer(self.model, penalties, sync="global")
        self.net: Callable[[torch.Tensor], torch.Tensor] = (
            torch.compile(self.model) if args.compile else self.model
        )



def run_single(args: argparse.Namespace) -> dict[str, Any]:
    """``--single``: interleaved paired rounds in this process; returns round times and warm-up times."""
    torch.set_num_threads(args.threads)
    names = ["none", *(n for n in args.penalties.split(",") if n)]
    variants = [SingleVariant(n, args) for n in names]
    gen = torch.Generator().manual_seed(1000)
    xs = [torch.randn(args.batch, args.width, generator=gen) for _ in range(4)]
    pool = [(x, torch.randint(0, 10, (args.batch,), generator=gen)) for x in xs]
    first: dict[str, list[float]] = {}
    for v in variants:
        first[v.name] = []
        for i in range(max(args.warmup, 3)):
            t0 = time.perf_counter()
            v.step(*pool[i % len(pool)])
            first[v.name].append(time.perf_counter() - t0)
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    rounds: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(args.rounds):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            t0 = clock()
            for i in range(args.steps_per_round):
                v.step(*pool[i % len(pool)])
            rounds[v.name].append((clock() - t0) / args.steps_per_round)
    return {"round_s": rounds, "warmup_s": first}


def report_single(args: argparse.Namespace, res: dict[str, Any]) -> dict[str, Any]:
    """Print ``--single``'s table; return the summary for ``--json``."""
    times: dict[str, list[float]] = res["round_s"]
    base = times["none"]
    m = machine()
    mode_name = "torch.compile (inductor)" if args.compile else "eager"
    print(
        f"one process, {args.threads} thread(s), {mode_name}, {args.clock} clock, SGD, {args.layers} x "
        f"Linear({args.width}, {args.width}) + ReLU regularized, batch {args.batch}; {args.rounds} "
        f"interleaved rounds x {args.steps_per_round} steps per variant"
    )
    print(
        f"machine: {m['cpu_count']} CPUs, torch {m['torch']}, model name {m['cpu_model'] or '?'!r}, "
        f"Python {m['python']}; actreg fused statistics: {_fused_state()}\n"
    )
    print("| variant | median step (ms) | vs none: median of paired ratios [IQR] | first steps (s) |")
    print("| --- | ---: | ---: | --- |")
    summary: dict[str, Any] = {}
    for v, ts in times.items():
        q1, med, q3 = quartiles([t / b for t, b in zip(ts, base, strict=True)])
        warm = res["warmup_s"][v]
        summary[v] = {
            "median_step_ms": 1e3 * statistics.median(ts),
            "ratio_median": med,
            "ratio_q1": q1,
            "ratio_q3": q3,
            "warmup_s": warm,
        }
        firsts = ", ".join(f"{t:.2f}" for t in warm[:3])
        print(f"| {v} | {1e3 * statistics.median(ts):.2f} | {med:.3f}× [{q1:.3f}–{q3:.3f}] | {firsts} |")
    return {"machine": m, "summary": summary}


def _fused_state() -> str:
    fused = getattr(actreg, "fused", None)
    describe = getattr(fused, "describe", None)
    return describe() if callable(describe) else "not available (this actreg has none)"


def quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
    """(q1, median, q3); all equal for a single value."""
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def overhead_quotient(naive: float, actreg_: float) -> float:
    """(naive - 1) / (actreg - 1); +inf when actreg's overhead is not positive but naive's is."""
    a, b = naive - 1.0, actreg_ - 1.0
    if b <= 0:
        return math.inf if a > 0 else math.nan
    return a / b


def machine() -> dict[str, Any]:
    model_name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "processor": platform.processor(),
        "cpu_model": model_name,
        "python": platform.python_version(),
    }


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def report(args: argparse.Namespace, res: dict[str, Any]) -> dict[str, Any]:
    """Print the table, derived lines and targets; return the summary for ``--json``."""
    times: dict[str, list[float]] = res["round_s"][0]  # rank 0 (the barriers make the ranks agree)
    names = list(times)
    base = times["none"]
    ratios = {v: [t / b for t, b in zip(times[v], base, strict=True)] for v in names}
    ddp = res["collectives"]["none"]
    summary: dict[str, Any] = {}
    for v in names:
        q1, med, q3 = quartiles(ratios[v])
        summary[v] = {
            "median_step_ms": 1e3 * statistics.median(times[v]),
            "ratio_median": med,
            "ratio_q1": q1,
            "ratio_q3": q3,
            "extra_collectives": res["collectives"][v] - ddp,
        }
    targets = {
        "global-L1": f"target ≤ {TARGET_GLOBAL_L1:.2f}×",
        "global-DeCov": f"target ≤ {TARGET_GLOBAL_DECOV:.2f}×",
    }
    m = machine()
    print(
        f"W={args.nproc} gloo ranks (1 thread each), DDP + SGD, {args.layers} x Linear({args.width}, "
        f"{args.width}) + ReLU regularized, batch {args.batch}/rank; {args.rounds} interleaved rounds x "
        f"{args.steps_per_round} steps per variant after {args.warmup} warm-up steps"
    )
    print(
        f"machine: {m['cpu_count']} CPUs, torch {m['torch']}, processor {m['processor'] or '?'!r}, "
        f"model name {m['cpu_model'] or '?'!r}, Python {m['python']}\n"
    )
    print(
        "| variant | median step (ms) | vs none: median of paired ratios [IQR] "
        "| collectives per step beyond DDP's own | target |"
    )
    print("| --- | ---: | ---: | ---: | --- |")
    for v in names:
        s = summary[v]
        target = targets.get(v, "")
        if target:
            limit = TARGET_GLOBAL_L1 if v == "global-L1" else TARGET_GLOBAL_DECOV
            target += f" ({met(s['ratio_median'] <= limit)})"
        print(
            f"| {v} | {s['median_step_ms']:.2f} | {s['ratio_median']:.3f}× "
            f"[{s['ratio_q1']:.3f}–{s['ratio_q3']:.3f}] | {s['extra_collectives']} | {target} |"
        )
    print(f"\n(DDP's own: {ddp} c10d:: events per step in `none`)")

    quot = [overhead_quotient(n, g) for n, g in zip(ratios["naive-L1"], ratios["global-L1"], strict=True)]
    finite = [q for q in quot if not math.isnan(q)]
    q_med = statistics.median(finite) if finite else math.nan
    g_over = summary["global-L1"]["ratio_median"] - 1.0
    n_over = summary["naive-L1"]["ratio_median"] - 1.0
    nonpos = sum(1 for g in ratios["global-L1"] if g <= 1.0)
    ok = met(q_med >= TARGET_NAIVE_OVER_ACTREG)
    print(
        f"naive overhead / actreg overhead = {q_med:.2f} — target ≥ {TARGET_NAIVE_OVER_ACTREG:.0f} ({ok})\n"
        f"  (median over rounds of the paired quotient (naive-L1 ratio - 1) / (global-L1 ratio - 1); "
        f"{nonpos}/{len(quot)} rounds with global-L1 overhead ≤ 0 count as inf)"
    )
    print(
        f"  from the median ratios: naive-L1 overhead {100 * n_over:+.1f} %, global-L1 overhead "
        f"{100 * g_over:+.1f} %, quotient {overhead_quotient(n_over + 1, g_over + 1):.2f}"
    )
    summary["naive_over_actreg_overhead_median"] = q_med
    summary["naive_over_actreg_overhead_per_round"] = quot
    return {"machine": m, "summary": summary}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="gloo ranks")
    p.add_argument("--layers", type=int, default=8, help="regularized hidden layers")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--batch", type=int, default=128, help="per-rank batch")
    p.add_argument("--rounds", type=int, default=20, help="interleaved paired rounds")
    p.add_argument("--steps-per-round", type=int, default=10, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant, once at the start")
    p.add_argument("--all", action="store_true", help="also the global-L1+VF variant (L1 + VarianceFloor)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write raw round times here")
    p.add_argument("--single", action="store_true", help="one process, no DDP: none / L1 / DeCov")
    p.add_argument("--compile", action="store_true", help="--single: torch.compile every variant's model")
    p.add_argument("--threads", type=int, default=1, help="--single: torch threads")
    p.add_argument(
        "--clock",
        choices=["wall", "thread"],
        default="wall",
        help="--single: time rounds by wall clock, or by this thread's CPU time (time spent waiting "
        "for a core on a loaded machine is left out; needs --threads 1)",
    )
    p.add_argument("--penalties", default="L1,DeCov", help="--single: variants besides none")
    args = p.parse_args()
    if args.rounds < 1 or args.steps_per_round < 1 or args.layers < 1:
        p.error("--rounds, --steps-per-round and --layers must be at least 1")
    if args.single:
        out = report_single(args, run_single(args))
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
            args.json.write_text(json.dumps({"config": config, **out}, indent=1, default=str) + "\n")
        return
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned ranks before torch starts there
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    q = mp.get_context("spawn").Queue()
    procs = mp.start_processes(
        worker, args=(args.nproc, port, args, q), nprocs=args.nproc, join=False, start_method="spawn"
    )
    while True:  # a failed rank raises here instead of leaving the queue waiting forever
        try:
            res = q.get(timeout=1.0)
            break
        except queue.Empty:
            if procs.join(timeout=0):
                raise RuntimeError("the ranks exited without a result") from None
    while not procs.join():
        pass
    out = report(args, res)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        data = {"config": config, **out, "collectives": res["collectives"], "orders": res["orders"]}
        data["round_s_per_rank"] = res["round_s"]
        args.json.write_text(json.dumps(data, indent=1, default=str) + "\n")
        print(f"\nraw round times: {args.json}")


if __name__ == "__main__":
    main()
