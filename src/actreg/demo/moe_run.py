"""The worker of ``actreg moe``; also runnable under ``torchrun``.

    torchrun --nproc-per-node 2 -m actreg.demo.moe_run --out runs/moe

In one process group, trains the MoE byte language model of :mod:`actreg.demo.moe_lm` once per seed
and balancing variant (:mod:`actreg.demo.moe_variants`) with the same data and budget, then rank 0
writes ``moe.json``, ``moe.md`` and the PNGs of :mod:`actreg.demo.moe_report` into ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

from .distributed import finish, init_distributed, run_worker
from .moe_config import MoEConfig, add_moe_arguments, moe_config_from_args
from .moe_data import load_domains
from .moe_metrics import run_figures
from .moe_report import write_outputs
from .moe_train import train_run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m actreg.demo.moe_run",
        description="actreg moe worker: one rank of the MoE balance comparison (launch with torchrun).",
    )
    add_moe_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Worker entry point (``torchrun ... -m actreg.demo.moe_run [options]``)."""
    args = build_parser().parse_args(argv)
    try:
        cfg = moe_config_from_args(args)
    except ValueError as err:
        print(f"actreg moe: error: {err}", file=sys.stderr)
        return 2
    return run_worker("moe", lambda: _run(cfg))


def _run(cfg: MoEConfig) -> int:
    ctx = init_distributed("gloo")  # the model and data live on the CPU
    started = time.perf_counter()
    domains = load_domains(cfg.domains, cfg.max_bytes)
    if ctx.is_main:
        sizes = ", ".join(f"{d.name} {d.tokens} bytes" for d in domains)
        print(f"actreg moe: {ctx.world_size} rank(s); domains: {sizes}", flush=True)
    names = [d.name for d in domains]
    runs: list[dict[str, Any]] = []
    for seed in cfg.seeds:
        for variant in cfg.variants:
            log = train_run(cfg, ctx, domains, variant, seed)
            if log is not None:
                f = run_figures(log, names)
                print(
                    f"  seed {seed} {variant:>8}: ppl {f['ppl/overall']:.3f}, MaxVio global "
                    f"{f['maxvio_global']:.3f}, MI {f['mi_bits']:.3f} bits, top-2 share "
                    f"{f['top2_share']:.3f}, {f['tokens_per_s']:.0f} tokens/s",
                    flush=True,
                )
                runs.append(log)
    if ctx.is_main:
        path, table = write_outputs(cfg, domains, runs, ctx.world_size, time.perf_counter() - started)
        print("\n" + table, flush=True)
        print(f"wrote {path}", flush=True)
    finish(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
