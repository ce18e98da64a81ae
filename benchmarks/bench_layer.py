"""Per-layer cost of recording: one regularized ``ReLU`` on a ``128 x 512`` activation, one process.

    python benchmarks/bench_layer.py [--rounds 15] [--width 512] [--batch 128]

Four variants, each its own module and regularizer (``L1(1e-4)``, ``sync="global"``, one process):
``plain`` (no regularizer), ``eager`` (``fused=False``), ``full`` (``fused=True`` with the
recorder's fast path turned off: every call takes the full recording path) and ``fast``
(``fused=True``: ``KernelThrough`` from the third step on). For each, rounds of 200 forwards
(``reg.recorder.take()`` after each: what the hook costs) and of 200 whole steps (forward,
``reg.loss()``, backward: the hook, the step's fixed part and the backward node), timed by the
thread's CPU time, interleaved; the minimum over rounds per call is printed (the least disturbed
figure on a shared machine).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

import actreg


def variant(name: str, x: torch.Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    model = nn.Sequential(nn.ReLU())
    reg = None
    if name != "plain":
        reg = actreg.ActivityRegularizer(model, {"0": actreg.L1(1e-4)}, fused=name != "eager")
        if name == "full":
            reg.recorder._set_fast = lambda *args: None  # type: ignore[method-assign]

    def step() -> None:
        loss = model(x).sum()
        if reg is not None:
            loss = loss + reg.loss()
        loss.backward()

    def forward() -> None:
        model(x)
        if reg is not None:
            reg.recorder.take()

    for _ in range(50):  # warm-up: agreement, kernels, fast path
        step()
    return forward, step


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(args.batch, args.width, requires_grad=True)
    names = ["plain", "eager", "full", "fast"]
    runs = {name: variant(name, x) for name in names}
    best = {name: [float("inf"), float("inf")] for name in names}
    for _ in range(args.rounds):
        for name in names:
            for i, fn in enumerate(runs[name]):
                start = time.thread_time()
                for _ in range(200):
                    fn()
                best[name][i] = min(best[name][i], (time.thread_time() - start) / 200 * 1e6)
    print(f"one ReLU on {args.batch} x {args.width}, L1, one process, 1 thread, thread clock, min of "
          f"{args.rounds} rounds x 200 calls; actreg fused: {actreg.fused.describe()}\n")
    print("| variant | forward (µs) | + over plain | whole step (µs) | + over plain |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in names:
        fwd, step = best[name]
        plain_fwd, plain_step = best["plain"]
        print(f"| {name} | {fwd:.1f} | {fwd - plain_fwd:+.1f} | {step:.1f} | {step - plain_step:+.1f} |")


if __name__ == "__main__":
    main()
