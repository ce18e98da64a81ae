"""Step time and collectives per step: actreg vs. no penalty vs. a naive per-layer all_reduce.

    python benchmarks/bench_step.py [--nproc 2] [--layers 8] [--width 256] [--batch 256] [--steps 30]

Each of ``--nproc`` gloo ranks trains an MLP of ``--layers`` hidden layers; every hidden layer gets
``L1`` and ``VarianceFloor`` (global-batch statistics). Variants, measured side by side in one run:

- ``none``: no penalty (the floor);
- ``actreg-local``: actreg, ``sync="local"`` (per-worker statistics, no communication);
- ``actreg-global``: actreg, ``sync="global"`` (one all_reduce per step);
- ``naive-global``: per-layer ``torch.distributed.nn.functional.all_reduce`` of each statistic
  (differentiable, so it communicates again in backward) — the "all_reduce per layer" approach.

Prints a markdown table: median step time (forward + penalty + backward + DDP + optimizer), the
ratio to ``none``, and the collectives counted with the profiler in one step.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dnn
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.profiler import ProfilerActivity, profile

import actreg

VARIANTS = ["none", "actreg-local", "actreg-global", "naive-global"]


def build(layers: int, width: int) -> nn.Sequential:
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.ReLU()]
    mods.append(nn.Linear(width, 10))
    return nn.Sequential(*mods)


class NaiveGlobal:
    """One differentiable all_reduce per statistic per layer (what actreg replaces)."""

    def __init__(self, model: nn.Module, layers: int) -> None:
        self.acts: list[torch.Tensor] = []
        for i in range(layers):
            model[2 * i + 1].register_forward_hook(lambda m, a, out: self.acts.append(out))

    def loss(self) -> torch.Tensor:
        total = torch.zeros(())
        for h in self.acts:
            n = dnn.all_reduce(torch.tensor(float(h.shape[0])))
            abs_sum = dnn.all_reduce(h.abs().sum())
            s1 = dnn.all_reduce(h.sum(0))
            s2 = dnn.all_reduce(h.pow(2).sum(0))
            var = (s2 - s1.pow(2) / n) / (n - 1)
            total = total + 1e-4 * abs_sum / n + torch.relu(1.0 - torch.sqrt(var + 1e-4)).mean()
        self.acts.clear()
        return total


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: Any) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {}
    for variant in VARIANTS:
        model = build(args.layers, args.width)
        net = DDP(model)
        opt = torch.optim.SGD(net.parameters(), lr=1e-3)
        penalties = {f"{2 * i + 1}": [actreg.L1(1e-4), actreg.VarianceFloor(1.0)] for i in range(args.layers)}
        if variant.startswith("actreg"):
            reg: Any = actreg.ActivityRegularizer(net, penalties, sync=variant.split("-")[1])
        elif variant == "naive-global":
            reg = NaiveGlobal(model, args.layers)
        else:
            reg = None
        gen = torch.Generator().manual_seed(rank)
        times = []
        collectives = 0
        for step in range(args.steps + 5):
            x = torch.randn(args.batch, args.width, generator=gen)
            y = torch.randint(0, 10, (args.batch,), generator=gen)
            dist.barrier()
            t0 = time.perf_counter()
            prof = profile(activities=[ProfilerActivity.CPU]) if step == 2 else None
            if prof:
                prof.__enter__()
            loss = nn.functional.cross_entropy(net(x), y)
            if reg is not None:
                loss = loss + reg.loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if prof:
                prof.__exit__(None, None, None)
                # DDP's own gradient buckets are counted separately: report only the difference
                collectives = sum(1 for e in prof.events() if e.name.startswith("c10d::"))
            elif step >= 5:
                times.append(time.perf_counter() - t0)
        results[variant] = {"median_ms": 1e3 * statistics.median(times), "collectives": collectives}
        if isinstance(reg, actreg.ActivityRegularizer):
            reg.remove()
    if rank == 0:
        out.put(results)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=256, help="per-rank batch")
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = mp.start_processes(
        worker, args=(args.nproc, port, args, q), nprocs=args.nproc, join=False, start_method="spawn"
    )
    res = q.get()
    while not procs.join():
        pass
    base = res["none"]["median_ms"]
    ddp_collectives = res["none"]["collectives"]
    print(
        f"W={args.nproc} gloo ranks, {args.layers} regularized layers of width {args.width}, "
        f"batch {args.batch}/rank, torch {torch.__version__}\n"
    )
    print("| variant | median step (ms) | vs none | collectives per step beyond DDP's own |")
    print("| --- | ---: | ---: | ---: |")
    for v in VARIANTS:
        r = res[v]
        extra = r["collectives"] - ddp_collectives
        print(f"| {v} | {r['median_ms']:.2f} | {r['median_ms'] / base:.2f}x | {extra} |")


if __name__ == "__main__":
    main()
