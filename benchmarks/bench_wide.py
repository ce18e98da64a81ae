"""DeCov on a wide layer with few rows per rank: first-step time, later-step time, peak memory.

    python benchmarks/bench_wide.py                                 # the issue's size (d = 16384)
    python benchmarks/bench_wide.py --width 2048 --steps 3          # smoke test, seconds

    [--nproc 2] [--width 16384] [--rows 8] [--inputs 64] [--steps 4] [--sync global]
    [--dtype float32] [--json PATH]

Each of ``--nproc`` gloo ranks (spawned, one thread each) trains ``Linear(inputs, width) + Tanh``
under DDP with SGD on ``--rows`` rows per rank, with ``actreg.DeCov(1e-3)`` on the ``Tanh`` output
(``sync="global"``; ``W * rows * d < d * d``, so the Gram matrix travels as rows). A step is the
forward, ``reg.loss()``, backward and ``opt.step()``, timed with ``time.perf_counter`` between two
``dist.barrier()`` calls. Reported per rank: the first step's time (it includes the agreement), the
median of the later steps, and the peak resident set size (``ru_maxrss``) of the rank's process
after the first step and at the end -- the process's own peak, model and torch included.

To measure another version of actreg, put its ``src`` first on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import actreg


def _peak_rss_gib() -> float:
    """Peak resident set size of this process so far, GiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dtype = getattr(torch, args.dtype)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(args.inputs, args.width), nn.Tanh()).to(dtype)
        net = DDP(model)
        reg = actreg.ActivityRegularizer(net, {"1": actreg.DeCov(1e-3)}, sync=args.sync)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        gen = torch.Generator().manual_seed(100 + rank)
        times, losses = [], []
        rss_first = 0.0
        for step in range(args.steps):
            x = torch.randn(args.rows, args.inputs, generator=gen, dtype=dtype)
            dist.barrier()
            start = time.perf_counter()
            opt.zero_grad()
            loss = net(x).square().mean() + reg.loss()
            loss.backward()
            opt.step()
            dist.barrier()
            times.append(time.perf_counter() - start)
            losses.append(float(loss.detach()))
            if step == 0:
                rss_first = _peak_rss_gib()
        reg.check()
        out.put(
            {
                "rank": rank,
                "first_s": times[0],
                "later_s": statistics.median(times[1:]) if len(times) > 1 else float("nan"),
                "later_all_s": times[1:],
                "peak_rss_first_gib": rss_first,
                "peak_rss_gib": _peak_rss_gib(),
                "losses": losses,
            }
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--width", type=int, default=16384)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--inputs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--sync", default="global", choices=["global", "ema"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, args.nproc, port, args, out)) for r in range(args.nproc)]
    for p in procs:
        p.start()
    results = sorted((out.get(timeout=3600) for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join()
    print(
        f"actreg {actreg.__file__}\ntorch {torch.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs; W = {args.nproc} gloo ranks, d = {args.width}, {args.rows} rows per "
        f"rank, {args.dtype}, sync={args.sync}, {args.steps} steps"
    )
    header = ["rank", "first step (s)", "later steps, median (s)"]
    header += ["peak RSS after step 1 (GiB)", "peak RSS (GiB)"]
    print("| " + " | ".join(header) + " |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(
            f"| {r['rank']} | {r['first_s']:.2f} | {r['later_s']:.3f} | "
            f"{r['peak_rss_first_gib']:.2f} | {r['peak_rss_gib']:.2f} |"
        )
    print("losses (rank 0):", results[0]["losses"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
