"""The comparison worker of ``actreg compare``; also runnable under ``torchrun``.

    torchrun --nproc-per-node 2 -m actreg.demo.compare --epochs 8 --out runs/compare

In one process group, trains the demo once per mode -- ``none`` (no penalty in the loss),
``local``, ``global``, ``ema`` -- with the same seed, data, initial weights and batch order, into
``--out/<mode>/``, then rank 0 writes ``compare.md``, ``compare.json``, ``compare.png`` and
``compare_histograms.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from actreg.modes import SYNC_MODES

from . import report
from .config import SYNC_CHOICES, TrainConfig, add_train_arguments, config_from_args
from .data import load_digits_split
from .distributed import finish, init_distributed, run_worker
from .train import RunResult, run_training

DEFAULT_MODES = ("none", *SYNC_MODES)


def parse_modes(text: str) -> list[str]:
    """``"none,global"`` -> ``["none", "global"]`` (validated, duplicates removed)."""
    modes: list[str] = []
    for m in (t.strip() for t in text.split(",")):
        if m not in SYNC_CHOICES:
            raise ValueError(f"--modes: unknown mode {m!r}; choose from {', '.join(SYNC_CHOICES)}")
        if m not in modes:
            modes.append(m)
    if not modes:
        raise ValueError("--modes: give at least one mode")
    return modes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m actreg.demo.compare",
        description="actreg compare worker: one rank of the side-by-side comparison (launch with torchrun).",
    )
    add_train_arguments(parser)
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES), help="comma-separated modes")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Worker entry point (``torchrun ... -m actreg.demo.compare [options]``).

    Runs under :func:`~actreg.demo.distributed.run_worker` (a failing rank stops every rank).
    """
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        modes = parse_modes(args.modes)
    except ValueError as err:
        print(f"actreg compare: error: {err}", file=sys.stderr)
        return 2
    return run_worker("compare", lambda: _compare(cfg, modes))


def _compare(cfg: TrainConfig, modes: list[str]) -> int:
    ctx = init_distributed(cfg.backend)
    out = Path(cfg.out)
    data = load_digits_split(cfg.seed, cfg.test_fraction)
    results: dict[str, RunResult] = {}
    for mode in modes:
        run_cfg = dataclasses.replace(cfg, sync=mode, out=str(out / mode), resume=False)
        # Not "[mode]": the console prints the title as rich markup, which swallows "[...]".
        title = f"actreg compare: sync={mode}, {ctx.world_size} rank(s), scenario {cfg.scenario}"
        results[mode] = run_training(run_cfg, ctx, data=data, title=title)
        if ctx.is_main:
            report.write_run_report(results[mode], plots=False)
    if ctx.is_main:
        path = report.write_compare_report(results, out, plots=cfg.plots)
        print("\n" + report.format_compare_table(results), flush=True)
        print(f"wrote {path}", flush=True)
    finish(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
