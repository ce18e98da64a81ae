"""The ``actreg`` command.

    actreg train   [options]          # W-rank training demo on scikit-learn's digits
    actreg compare [options]          # no penalty vs local / global / ema, side by side
    actreg verify  [MODULE:FACTORY]   # 1 rank vs W ranks gradients of your model: PASS/FAIL
    actreg moe     [options]          # micro-batch vs global-batch MoE balance on a byte-level MoE LM

``train`` and ``compare`` start their workers with ``torch.distributed``'s elastic launcher (the
machinery of ``torchrun``); the same workers run under ``torchrun -m actreg.demo.train`` /
``-m actreg.demo.compare`` for multi-node use. See ``docs/cli.md``.

Exit status: 0 success (verify: PASS); 1 a worker failed (verify: FAIL); 2 a usage or
configuration error, before any worker starts; 3 verify: your factory or model raised; 4 verify: a
worker failed otherwise; 130 / 143 stopped by SIGINT / SIGTERM (128 + the signal's number).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .modes import SYNC_MODES


def _check_demo_dependencies(plots: bool) -> None:
    from .demo._deps import require

    require("sklearn.datasets")
    require("rich.console")
    if plots:
        require("matplotlib")


def _cmd_train(args: argparse.Namespace) -> int:
    from .demo.config import config_from_args
    from .demo.launch import Interrupted, launch_module
    from .demo.preflight import validate_before_launch

    cfg = config_from_args(args)
    _check_demo_dependencies(cfg.plots)
    validate_before_launch(cfg)
    started = time.perf_counter()
    print(f"actreg train: {cfg.nproc} worker process(es) via torch.distributed elastic launch", flush=True)
    try:
        note = launch_module(cfg.nproc, "actreg.demo.train", cfg.to_argv())
    except Interrupted as err:
        err.detail = _resume_hint(cfg.out)
        raise
    if note:
        print(f"actreg train: {note}", file=sys.stderr)
    print(f"actreg train: done in {time.perf_counter() - started:.1f}s; see {Path(cfg.out) / 'report.md'}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .demo.compare import parse_modes
    from .demo.config import TrainConfig, config_from_args
    from .demo.launch import launch_module
    from .demo.preflight import validate_before_launch

    cfg = config_from_args(args)
    if args.out is None and cfg.out == TrainConfig().out:
        cfg.out = "runs/compare"
    modes = parse_modes(args.modes)
    _check_demo_dependencies(cfg.plots)
    validate_before_launch(cfg, modes)
    started = time.perf_counter()
    print(f"actreg compare: modes {', '.join(modes)} with {cfg.nproc} worker process(es)", flush=True)
    note = launch_module(cfg.nproc, "actreg.demo.compare", [*cfg.to_argv(), "--modes", ",".join(modes)])
    if note:
        print(f"actreg compare: {note}", file=sys.stderr)
    print(f"actreg compare: done in {time.perf_counter() - started:.1f}s; see {Path(cfg.out) / 'compare.md'}")
    return 0


def _cmd_moe(args: argparse.Namespace) -> int:
    from .demo._deps import require
    from .demo.launch import launch_module
    from .demo.moe_config import moe_config_from_args

    cfg = moe_config_from_args(args)
    require("numpy")
    _check_demo_dependencies(cfg.plots)
    started = time.perf_counter()
    runs = len(cfg.seeds) * len(cfg.variants)
    print(
        f"actreg moe: {runs} runs ({', '.join(cfg.variants)} x seeds {','.join(map(str, cfg.seeds))}) "
        f"with {cfg.nproc} worker process(es)",
        flush=True,
    )
    note = launch_module(cfg.nproc, "actreg.demo.moe_run", cfg.to_argv())
    if note:
        print(f"actreg moe: {note}", file=sys.stderr)
    print(f"actreg moe: done in {time.perf_counter() - started:.1f}s; see {Path(cfg.out) / 'moe.md'}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .demo.verify import run_verify

    result = run_verify(
        args.target,
        nproc=args.nproc,
        sync=args.sync,
        tol=args.tol,
        dtype=args.dtype,
        task_loss=args.task_loss,
        decay=args.decay,
    )
    print(result.format())
    if result.note:
        print(f"actreg verify: {result.note}", file=sys.stderr)
    return 0 if result.passed else 1


def _resume_hint(out: str) -> str:
    """Where an interrupted run can continue from (the checkpoints are written atomically)."""
    from .demo.checkpoints import latest_checkpoint

    path = latest_checkpoint(out)
    if path is None:
        return "no checkpoint was written yet"
    return f"the last complete checkpoint is {path}; continue with --resume"


def _raise_interrupted(signum: int, _frame: object) -> None:
    from .demo.launch import Interrupted

    raise Interrupted(signum)


def build_parser() -> argparse.ArgumentParser:
    """The ``actreg`` argument parser (subcommands ``train``, ``compare``, ``verify``, ``moe``)."""
    from .demo.config import add_train_arguments, positive_finite
    from .demo.moe_config import add_moe_arguments

    parser = argparse.ArgumentParser(
        prog="actreg",
        description="actreg: exact activity regularization for data-parallel PyTorch -- demo and checks.",
        epilog="See docs/cli.md. Multi-node: torchrun --nnodes N ... -m actreg.demo.train [train options].",
    )
    parser.add_argument("--version", action="version", version=f"actreg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "train",
        help="train the digits demo on W worker processes",
        description="Train an MLP on scikit-learn's digits with W ranks (gloo on CPU, NCCL on GPUs) and "
        "activity penalties on its hidden layers. Writes metrics.jsonl, checkpoints, report.md, plots.",
    )
    add_train_arguments(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "compare",
        help="the same run with no penalty, local, global and ema side by side",
        description="Run the demo training once per sync mode (same seed, data, init, batch order) in one "
        "launch and write compare.md / compare.json / compare.png (default --out runs/compare).",
    )
    add_train_arguments(p)
    p.add_argument(
        "--modes", default="none,local,global,ema", help="comma-separated modes (default: all four)"
    )
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser(
        "verify",
        help="check that W ranks give the gradients of 1 rank for your model",
        description="Import FACTORY from MODULE (or a file.py), a zero-argument callable returning (model, "
        "batch, penalties); batch is inputs or (inputs, targets). Compute the gradients of task loss + "
        "reg.loss() on the whole batch in one process, then on W ranks with uneven shards under DDP, "
        "and report the largest difference. Exit code 0 on PASS, 1 on FAIL, 2 on a usage error, 3 when "
        "your factory or model raised, 4 when a worker failed otherwise.",
    )
    p.add_argument(
        "target",
        nargs="?",
        default="actreg.demo.model:verify_factory",
        help="MODULE:FACTORY or path/to/file.py:FACTORY (default: the demo model)",
    )
    p.add_argument(
        "--nproc", type=int, default=2, metavar="W", help="ranks of the distributed run (default 2)"
    )
    p.add_argument(
        "--sync",
        choices=SYNC_MODES,
        default="global",
        help="regularizer mode of the distributed run (default global; local shows the failure)",
    )
    p.add_argument(
        "--tol",
        type=positive_finite,
        default=None,
        help="PASS if max |g_W - g_1| / max |g_1| <= tol (default 1e-6 in float64, 1e-4 in float32)",
    )
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="compute dtype")
    p.add_argument(
        "--task-loss",
        choices=("auto", "none", "ce"),
        default="auto",
        help="add cross-entropy on (inputs, integer targets): auto = when the batch has them",
    )
    p.add_argument("--decay", type=float, default=0.99, help="EMA decay for --sync ema")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser(
        "moe",
        help="micro-batch vs global-batch balance on a small MoE language model",
        description="Train a small decoder-only MoE byte language model (8 experts, top-2) on text of "
        "several domains shipped with Python and the demo's dependencies, each micro-batch from one "
        "domain, once per balancing variant and seed (none; LoadBalance per micro-batch, global, over "
        "the accumulation window; ExpertBias; ExpertBias + SequenceBalance), and write moe.md / "
        "moe.json / moe_heatmap.png / moe_curves.png (default --out runs/moe).",
    )
    add_moe_arguments(p)
    p.set_defaults(func=_cmd_moe)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``actreg`` console script; returns the exit status (see the module doc)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .demo._deps import MissingDependencyError
    from .demo.launch import Interrupted, WorkerFailedError
    from .demo.verify import FACTORY_RAISED, FactoryError

    if threading.current_thread() is threading.main_thread():
        # Until the launcher installs its own handlers (which end the workers, then raise).
        signal.signal(signal.SIGTERM, _raise_interrupted)
    command = f"actreg {args.command}"
    try:
        return int(args.func(args))
    except FactoryError as err:
        print(f"{command}: error: {err}", file=sys.stderr)
        return FACTORY_RAISED
    except (ValueError, MissingDependencyError) as err:
        print(f"{command}: error: {err}", file=sys.stderr)
        return 2
    except WorkerFailedError as err:
        print(f"{command}: error: {err}", file=sys.stderr)
        return 4 if args.command == "verify" else 1
    except (Interrupted, KeyboardInterrupt) as err:
        signum = err.signum if isinstance(err, Interrupted) else int(signal.SIGINT)
        detail = getattr(err, "detail", "")
        if sys.stdout.isatty():
            print("\x1b[?25h", end="", flush=True)  # a worker stopped mid-progress-bar hid the cursor
        name = signal.Signals(signum).name
        print(f"{command}: interrupted by {name}" + (f"; {detail}" if detail else ""), file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
