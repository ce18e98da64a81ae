"""The per-rank training worker of ``actreg train``; also runnable under ``torchrun``.

    torchrun --nproc-per-node 2 -m actreg.demo.train --epochs 8 --out runs/train
    python -m actreg.demo.train --epochs 8          # one process, no torch.distributed

Each rank trains the same :class:`~actreg.demo.model.DigitsMLP` under DDP on its contiguous share
of every global batch, with an :class:`actreg.ActivityRegularizer` in the chosen ``--sync`` mode.
Two *measurement* regularizers run beside it (their losses are never backpropagated): one in
``sync="local"`` (no communication) giving each rank's view of the penalties and activity, one in
``sync="global"`` giving the true global-batch figures (reused from the training regularizer when
that is already global). Rank 0 gathers the per-rank figures once per epoch, so the run shows how
far per-rank statistics are from the global ones.

Rank 0 locks and writes ``--out``: ``metrics.jsonl``, ``checkpoints/epoch_NNN.pt`` (verified, the
newest ``--keep``; see :mod:`actreg.demo.checkpoints`), ``report.md``, PNG plots and with
``--tensorboard`` TensorBoard events. ``--resume`` restores the newest good checkpoint and the
history up to it; the result equals an uninterrupted run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import actreg

from . import report
from .checkpoints import (
    check_resume,
    checkpoint_path,
    find_resume_point,
    prune_checkpoints,
    read_history,
    save_checkpoint,
    set_aside,
)
from .config import TrainConfig, add_train_arguments, build_penalties, config_from_args
from .data import Digits, global_batches, load_digits_split, shard_bounds
from .distributed import (  # noqa: F401 - DistContext, init_distributed, ... re-exported for importers
    DistContext,
    broadcast_from_main,
    finish,
    gather_to_main,
    init_distributed,
    run_worker,
    shutdown_distributed,
)
from .model import DigitsMLP
from .rundir import (
    TENSORBOARD_DIR,
    check_reuse,
    clear_previous_run,
    lock_run_directory,
    prepare_output,
    unlock_run_directory,
)
from .tblog import TensorBoardLog

#: Activity keys of ``ActivityRegularizer.metrics()`` (the other per-slot keys are penalties).
ACTIVITY_KEYS = ("count", "mean_abs", "rms", "active_fraction", "dead_units")


# ---------------------------------------------------------------------- results
@dataclass
class RunResult:
    """What a finished run leaves on rank 0 (``history`` is empty on the other ranks)."""

    config: TrainConfig
    history: list[dict[str, Any]]
    activations: dict[str, Tensor]
    world_size: int
    wall_s: float

    @property
    def epochs(self) -> list[dict[str, Any]]:
        return [r for r in self.history if r["type"] == "epoch"]

    @property
    def final(self) -> dict[str, Any]:
        return self.epochs[-1] if self.epochs else {}


# ---------------------------------------------------------------------- helpers
def _split_metrics(m: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """``metrics()`` -> (penalty values, activity figures), without ``total`` and counts."""
    penalties, activity = {}, {}
    for key, value in m.items():
        if key == "total":
            continue
        layer, _, name = key.rpartition("/")
        if name in ACTIVITY_KEYS:
            if name != "count":
                activity[key] = value
        else:
            penalties[key] = value
        del layer
    return penalties, activity


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _evaluate(
    model: nn.Module, x: Tensor, y: Tensor, layers: Sequence[str], ctx: DistContext
) -> dict[str, Any]:
    """Loss, accuracy and per-layer activity on ``x`` (sharded over ranks, one all_reduce)."""
    lo, hi = shard_bounds(x.shape[0], ctx.world_size, ctx.rank)
    logits, captured = _forward_capturing(model, x[lo:hi], layers)
    parts = [
        F.cross_entropy(logits, y[lo:hi], reduction="sum").reshape(1),
        (logits.argmax(-1) == y[lo:hi]).sum().reshape(1),
        torch.tensor([hi - lo], device=logits.device),
    ]
    dims = []
    for name in layers:
        a = captured[name].reshape(-1, captured[name].shape[-1]).double()
        dims.append(a.shape[-1])
        parts += [a.abs().sum().reshape(1), (a.abs() > 0).sum(0)]
    flat = torch.cat([p.double() for p in parts])
    if ctx.distributed:
        dist.all_reduce(flat)
    values = flat.tolist()
    n = max(values[2], 1.0)
    out: dict[str, Any] = {"loss": values[0] / n, "acc": values[1] / n, "activity": {}}
    pos = 3
    for name, d in zip(layers, dims, strict=True):
        abs_sum, active = values[pos], values[pos + 1 : pos + 1 + d]
        pos += 1 + d
        out["activity"][name] = {
            "active_fraction": sum(active) / (n * d),
            "dead_units": float(sum(1 for a in active if a == 0)),
            "mean_abs": abs_sum / (n * d),
        }
    return out


def _forward_capturing(
    model: nn.Module, x: Tensor, layers: Sequence[str]
) -> tuple[Tensor, dict[str, Tensor]]:
    """``model(x)`` without autograd, and the outputs of the modules named in ``layers``."""
    modules = dict(model.named_modules())
    captured: dict[str, Tensor] = {}
    handles = [
        modules[name].register_forward_hook(lambda _m, _i, out, name=name: captured.__setitem__(name, out))
        for name in layers
    ]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, captured


def layer_activations(model: nn.Module, x: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
    """The outputs of ``layers`` on ``x`` (no grad, on CPU), for histograms."""
    _, captured = _forward_capturing(model, x, layers)
    return {name: captured[name].detach().float().cpu() for name in layers}


class _Console:
    """Rank 0's output: a rich progress bar (on a terminal) and a per-epoch table."""

    COLUMNS = (
        ("epoch", 5),
        ("train loss", 10),
        ("test loss", 9),
        ("test acc", 8),
        ("penalty", 9),
        ("obj. err", 8),
        ("rank dis.", 9),
    )

    def __init__(self, enabled: bool, progress: bool, layers: Sequence[str], title: str) -> None:
        self.enabled = enabled
        self.layers = list(layers)
        self.progress: Any = None
        self.task: Any = None
        self.console: Any = None
        if not enabled:
            return
        from ._deps import require

        rich_console = require("rich.console")
        self.console = rich_console.Console(highlight=False, soft_wrap=True)
        if progress and self.console.is_terminal:
            p = require("rich.progress")
            self.progress = p.Progress(
                p.TextColumn("{task.description}"),
                p.BarColumn(),
                p.MofNCompleteColumn(),
                p.TextColumn("loss {task.fields[loss]:.3f}"),
                p.TimeElapsedColumn(),
                p.TimeRemainingColumn(),
                console=self.console,
            )
        self.console.print(f"[bold]{title}[/bold]")
        header = " ".join(f"{name:>{w}}" for name, w in self.COLUMNS)
        header += "".join(f" {name + ' act%':>11}" for name in self.layers) + "  dead   time"
        self.console.print(f"[bold]{header}[/bold]")

    def start(self, total: int, done: int) -> None:
        if self.progress is not None:
            self.progress.start()
            self.task = self.progress.add_task("training", total=total, completed=done, loss=float("nan"))

    def step(self, description: str, loss: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, description=description, loss=loss)

    def epoch(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return

        def f(v: Any, w: int, spec: str) -> str:
            return f"{'-':>{w}}" if v is None else f"{v:>{w}{spec}}"

        obj = rec["objective_error"]
        cells = [
            f"{rec['epoch']:>5}",
            f(rec["train_loss"], 10, ".4f"),
            f(rec["test_loss"], 9, ".4f"),
            f(100 * rec["test_acc"], 7, ".2f") + "%",
            f(rec["penalty_global"], 9, ".4f"),
            f(None if obj is None else 100 * obj, 7, ".2f") + ("%" if obj is not None else " "),
            f(100 * rec["rank_disagreement"], 8, ".2f") + "%",
        ]
        test_act = rec["test_activity"]
        cells += [f"{100 * test_act[n]['active_fraction']:>10.1f}%" for n in self.layers]
        dead = sum(int(test_act[n]["dead_units"]) for n in self.layers)
        line = " ".join(cells) + f" {dead:>5} {rec['time_s']:>5.1f}s"
        if self.progress is not None:
            self.progress.console.print(line)
        else:
            self.console.print(line)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)


# ---------------------------------------------------------------------- the run
def run_training(
    cfg: TrainConfig, ctx: DistContext, *, data: Digits | None = None, title: str | None = None
) -> RunResult:
    """Train the demo model on this rank (all ranks call it with the same ``cfg``)."""
    started = time.perf_counter()
    out = Path(cfg.out)
    data = (data or load_digits_split(cfg.seed, cfg.test_fraction)).to(ctx.device)

    torch.manual_seed(cfg.seed)
    model = DigitsMLP(data.num_features, cfg.hidden, data.num_classes).to(ctx.device)
    net: nn.Module = model
    if ctx.distributed:
        net = DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )
    reg = None
    if cfg.sync != "none":
        reg = actreg.ActivityRegularizer(net, build_penalties(cfg.penalties), sync=cfg.sync, decay=cfg.decay)
    # Measurement only: the local view of each rank, and the global truth.
    local_probe = (
        reg
        if cfg.sync == "local"
        else actreg.ActivityRegularizer(model, build_penalties(cfg.penalties), sync="local")
    )
    global_probe = (
        reg
        if cfg.sync == "global"
        else actreg.ActivityRegularizer(model, build_penalties(cfg.penalties), sync="global")
    )
    layers = global_probe.slot_names
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)

    start_epoch = 0
    console = _Console(
        ctx.is_main,
        cfg.progress,
        layers,
        title or f"actreg demo: digits, {ctx.world_size} rank(s), sync={cfg.sync}, out={out}",
    )
    # Rank 0 checks and locks --out and reads the checkpoint to resume; every rank gets the outcome.
    opened: dict[str, Any] = {}
    history: list[dict[str, Any]] = []  # rank 0 only
    owns_lock = False  # rank 0 took the lock of --out (when no parent process holds it)
    if ctx.is_main:
        try:
            prepare_output(out, tensorboard=cfg.tensorboard)
            owns_lock = lock_run_directory(out)
            opened = _open_run(cfg, console)
        except (ValueError, OSError) as err:
            opened = {"error": f"actreg: error on rank 0: {err}"}
        history = opened.pop("history", [])
    opened = broadcast_from_main(ctx, opened)
    if "error" in opened:
        if owns_lock:
            unlock_run_directory(out)
        raise SystemExit(opened["error"])
    state = opened.get("state")
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if reg is not None and state["regularizer"]:
            reg.load_state_dict(state["regularizer"])
        start_epoch = int(state["epoch"])

    n_train = data.x_train.shape[0]
    batches_per_epoch = math.ceil(n_train / cfg.batch_size)
    console.start(total=batches_per_epoch * cfg.epochs, done=batches_per_epoch * start_epoch)
    global_step = start_epoch * batches_per_epoch
    zero = torch.zeros((), device=ctx.device)
    tensorboard = None
    if ctx.is_main and cfg.tensorboard:
        tensorboard = TensorBoardLog(out / TENSORBOARD_DIR, first_step=global_step + 1)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            epoch_started = time.perf_counter()
            model.train()
            rows: list[dict[str, Any]] = []
            globals_: list[dict[str, float]] = []
            for idx in global_batches(n_train, cfg.batch_size, cfg.seed, epoch):
                lo, hi = shard_bounds(idx.numel(), ctx.world_size, ctx.rank)
                sel = idx[lo:hi].to(ctx.device)
                x, y = data.x_train[sel], data.y_train[sel]
                logits = net(x)
                ce_sum = F.cross_entropy(logits, y, reduction="sum")
                # Sum over the shard, scaled so that DDP's average over ranks is the global-batch mean.
                task = ce_sum * (ctx.world_size / idx.numel())
                penalty = reg.loss() if reg is not None else zero
                local_value = local_probe.loss() if local_probe is not reg else penalty
                global_value = global_probe.loss() if global_probe is not reg else penalty
                del local_value, global_value  # measurement only: never backpropagated
                optimizer.zero_grad(set_to_none=True)
                (task + penalty).backward()
                optimizer.step()

                local_pen, local_act = _split_metrics(local_probe.metrics())
                rows.append(
                    {
                        "ce": ce_sum.item(),
                        "correct": (logits.argmax(-1) == y).sum().item(),
                        "n": hi - lo,
                        "opt": float(penalty.item()),
                        "local_total": local_probe.metrics()["total"],
                        "local_penalties": local_pen,
                        "local_active": {
                            k: v for k, v in local_act.items() if k.endswith("/active_fraction")
                        },
                    }
                )
                if ctx.is_main:
                    globals_.append(global_probe.metrics())
                global_step += 1
                console.step(f"epoch {epoch + 1}/{cfg.epochs}", ce_sum.item() / max(hi - lo, 1))

            per_rank = gather_to_main(ctx, rows)
            model.eval()
            test = _evaluate(model, data.x_test, data.y_test, layers, ctx)
            if ctx.is_main:
                steps = _step_records(per_rank, globals_, epoch, global_step - len(rows), cfg.sync)
                history.extend(steps)
                rec = _epoch_record(
                    steps, test, epoch, time.perf_counter() - epoch_started, ctx.world_size, cfg.sync
                )
                history.append(rec)
                # metrics.jsonl first: it always reaches at least the newest checkpoint's epoch.
                report.write_jsonl(out / "metrics.jsonl", history)
                save_checkpoint(
                    checkpoint_path(out, epoch + 1),
                    {
                        "epoch": epoch + 1,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "regularizer": reg.state_dict() if reg is not None else {},
                        "config": cfg.to_dict(),
                        "world_size": ctx.world_size,
                        "torch_rng": torch.get_rng_state(),
                    },
                )
                prune_checkpoints(out, cfg.keep)
                if tensorboard is not None:
                    tensorboard.write([*steps, rec])
                console.epoch(rec)
    finally:
        console.stop()
        if tensorboard is not None:
            tensorboard.close()
        if owns_lock:
            unlock_run_directory(out)

    activations: dict[str, Tensor] = {}
    if ctx.is_main:
        model.eval()
        activations = layer_activations(model, data.x_test, layers)
    result = RunResult(cfg, history, activations, ctx.world_size, time.perf_counter() - started)
    for r in (reg, local_probe, global_probe):
        if r is not None:
            r.remove()
    return result


def _open_run(cfg: TrainConfig, console: _Console) -> dict[str, Any]:
    """Rank 0, before training, with ``--out`` locked: the checkpoint to resume and its history.

    Returns ``{"state": checkpoint or None, "history": records up to its epoch}``; raises
    ``ValueError`` for a directory that cannot be used (see :mod:`actreg.demo.rundir`).
    """
    out = Path(cfg.out)
    if not cfg.resume:
        if cfg.overwrite:
            removed = clear_previous_run(out)
            if removed:
                console.print(f"--overwrite: deleted {len(removed)} file(s) of the previous run in {out}")
        check_reuse(cfg)
        return {"state": None, "history": []}
    point = find_resume_point(out)
    if point is None:
        console.print(f"--resume: no checkpoint in {out / 'checkpoints'}; starting from scratch")
        return {"state": None, "history": []}
    for line in point.warnings():
        console.print(line)
    check_resume(point, cfg)
    set_aside(point.skipped, console.print)
    history, warnings = read_history(out / "metrics.jsonl", point.epoch)
    for line in warnings:
        console.print(line)
    if point.epoch == cfg.epochs:
        console.print(f"--resume: already complete: {point.path} is at epoch {cfg.epochs}; nothing to train")
    else:
        console.print(f"resuming from {point.path} (epoch {point.epoch})")
    return {"state": point.state, "history": history}


def _step_records(
    per_rank: list[list[dict[str, Any]]],
    globals_: list[dict[str, float]],
    epoch: int,
    first_step: int,
    sync: str,
) -> list[dict[str, Any]]:
    """Rank 0: one record per step from every rank's rows and the global figures."""
    records = []
    for i, g in enumerate(globals_):
        rows = [rank_rows[i] for rank_rows in per_rank]
        n = sum(r["n"] for r in rows)
        g_pen, g_act = _split_metrics(g)
        g_total = g["total"]
        disagreement = {
            k: sum(_rel(r["local_penalties"][k], v) for r in rows) / len(rows) for k, v in g_pen.items()
        }
        for k, v in g_act.items():
            if k.endswith("/active_fraction"):
                disagreement[k] = sum(abs(r["local_active"][k] - v) for r in rows) / len(rows)
        objective_error = None if sync == "none" else sum(_rel(r["opt"], g_total) for r in rows) / len(rows)
        records.append(
            {
                "type": "step",
                "epoch": epoch + 1,
                "step": first_step + i + 1,
                "loss": sum(r["ce"] for r in rows) / max(n, 1),
                "acc": sum(r["correct"] for r in rows) / max(n, 1),
                "samples": n,
                "shard_sizes": [r["n"] for r in rows],
                "penalty_opt": sum(r["opt"] for r in rows) / len(rows),
                "penalty_global": g_total,
                "penalty_ranks": [r["local_total"] for r in rows],
                "objective_error": objective_error,
                "rank_disagreement": sum(v for k, v in disagreement.items() if k in g_pen)
                / max(len(g_pen), 1),
                "disagreement": disagreement,
                "global": {**g_pen, **g_act},
            }
        )
    return records


def _mean(values: Sequence[float]) -> float:
    return sum(values) / max(len(values), 1)


def _epoch_record(
    steps: list[dict[str, Any]], test: dict[str, Any], epoch: int, seconds: float, world_size: int, sync: str
) -> dict[str, Any]:
    """Rank 0: the epoch summary (train figures averaged over its steps, test figures)."""
    n = sum(s["samples"] for s in steps)
    keys = steps[0]["disagreement"].keys() if steps else []
    global_keys = steps[0]["global"].keys() if steps else []
    return {
        "type": "epoch",
        "epoch": epoch + 1,
        "sync": sync,
        "world_size": world_size,
        "steps": len(steps),
        "train_loss": sum(s["loss"] * s["samples"] for s in steps) / max(n, 1),
        "train_acc": sum(s["acc"] * s["samples"] for s in steps) / max(n, 1),
        "test_loss": test["loss"],
        "test_acc": test["acc"],
        "penalty_opt": _mean([s["penalty_opt"] for s in steps]),
        "penalty_global": _mean([s["penalty_global"] for s in steps]),
        "objective_error": None if sync == "none" else _mean([s["objective_error"] for s in steps]),
        "rank_disagreement": _mean([s["rank_disagreement"] for s in steps]),
        "disagreement": {k: _mean([s["disagreement"][k] for s in steps]) for k in keys},
        "train": {k: _mean([s["global"][k] for s in steps]) for k in global_keys},
        "test_activity": test["activity"],
        "time_s": seconds,
    }


# ---------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m actreg.demo.train",
        description="actreg demo worker: one rank of the digits training (launch with torchrun).",
    )
    add_train_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Worker entry point (``torchrun ... -m actreg.demo.train [options]``).

    Runs under :func:`~actreg.demo.distributed.run_worker`: a failure on this rank prints its
    traceback and ends the process at once (the launcher stops the other ranks).
    """
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        print(f"actreg: error: {err}", file=sys.stderr)
        return 2
    return run_worker("train", lambda: _train(cfg))


def _train(cfg: TrainConfig) -> int:
    ctx = init_distributed(cfg.backend)
    result = run_training(cfg, ctx)
    if ctx.is_main:
        report.write_run_report(result, plots=cfg.plots)
        print(f"wrote {Path(cfg.out) / 'report.md'}", flush=True)
    finish(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
