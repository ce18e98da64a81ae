"""``actreg verify``: are W ranks' gradients those of one process on the whole batch?

``MODULE:FACTORY`` names a zero-argument callable returning ``(model, batch, penalties)``: an
``nn.Module``, the batch (``inputs`` or ``(inputs, targets)``, split along dim 0) and the
``ActivityRegularizer`` penalties mapping. The check:

1. in this process (world size 1): gradients of ``task + reg.loss()`` on the whole batch;
2. W ranks (elastic launch, gloo): the model in DDP, each rank on its contiguous share of the batch
   (shards differ by one sample when the batch does not divide), ``ActivityRegularizer(...,
   sync=SYNC)``, the gradients of ``task * W / N + reg.loss()`` after DDP's averaging;
3. ``max |g_W - g_1| / max |g_1|`` over all parameters against ``--tol``: PASS or FAIL.

``task`` is the summed cross-entropy on integer targets (``--task-loss auto`` uses it when the
batch has them and the model output is ``[N, classes]``), divided by the batch size. The factory is
called after ``torch.manual_seed(0)`` in every process, and must give the same model and batch in
each (ranks check the batch). Everything runs in float64 by default.

The worker side runs as ``python -m actreg.demo.verify --worker TARGET --result FILE ...``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.elastic.multiprocessing.errors import record

import actreg
from actreg.modes import SYNC_MODES

from .data import shard_bounds

DEFAULT_TARGET = "actreg.demo.model:verify_factory"
DTYPES = {"float64": torch.float64, "float32": torch.float32}
DEFAULT_TOL = {"float64": 1e-6, "float32": 1e-4}


# ---------------------------------------------------------------------- the factory
def load_factory(target: str) -> Callable[[], Any]:
    """``"pkg.module:name"`` or ``"path/to/file.py:name"`` -> the callable."""
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected MODULE:FACTORY (e.g. mypkg.models:make), got {target!r}")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ValueError(f"{target!r}: no file {path}")
        spec = importlib.util.spec_from_file_location(f"_actreg_verify_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        if "" not in sys.path:
            sys.path.insert(0, "")  # the current directory, as for `python -m`
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"{target!r}: cannot import {module_name!r}: {err}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"{target!r}: {module_name} has no callable {attr!r}")
    return factory


@dataclass
class Problem:
    """What the factory returned, cast to the compute dtype."""

    model: nn.Module
    inputs: Tensor
    targets: Tensor | None
    penalties: Mapping[str, Any]


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def make_problem(target: str, dtype: torch.dtype) -> Problem:
    """Call the factory (after ``torch.manual_seed(0)``) and check/cast its result."""
    factory = load_factory(target)
    torch.manual_seed(0)
    made = factory()
    if not isinstance(made, (tuple, list)) or len(made) != 3:
        raise ValueError(f"{target}() must return (model, batch, penalties), got {type(made).__name__}")
    model, batch, penalties = made
    if not isinstance(model, nn.Module):
        raise ValueError(f"{target}(): the model must be an nn.Module, got {type(model).__name__}")
    if isinstance(batch, Tensor):
        inputs, targets = batch, None
    elif (
        isinstance(batch, (tuple, list))
        and 1 <= len(batch) <= 2
        and all(isinstance(b, Tensor) for b in batch)
    ):
        inputs, targets = batch[0], (batch[1] if len(batch) == 2 else None)
    else:
        raise ValueError(f"{target}(): the batch must be a tensor or (inputs, targets) tensors")
    if targets is not None and targets.shape[0] != inputs.shape[0]:
        raise ValueError(f"{target}(): inputs and targets have different batch sizes")
    return Problem(model.to(dtype), _cast(inputs, dtype), targets, penalties)


def _task_loss(mode: str, output: Any, targets: Tensor | None) -> Tensor | None:
    """Summed cross-entropy when ``mode`` asks for it (and ``auto`` finds it applicable)."""
    usable = (
        isinstance(output, Tensor)
        and targets is not None
        and not targets.is_floating_point()
        and output.dim() == 2
        and targets.dim() == 1
    )
    if mode == "none" or (mode == "auto" and not usable):
        return None
    if not usable:
        raise ValueError("--task-loss ce needs integer targets [N] and model outputs [N, classes]")
    return F.cross_entropy(output, targets, reduction="sum")


def _grads(model: nn.Module) -> dict[str, Tensor]:
    return {
        n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)).cpu()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def reference(problem: Problem, *, sync: str, decay: float, task_loss: str) -> dict[str, Any]:
    """Gradients in this process on the whole batch (world size 1)."""
    if dist.is_available() and dist.is_initialized():
        raise RuntimeError("the reference must run outside torch.distributed")
    reg = actreg.ActivityRegularizer(problem.model, problem.penalties, sync=sync, decay=decay)
    out = problem.model(problem.inputs)
    task = _task_loss(task_loss, out, problem.targets)
    penalty = reg.loss()
    loss = penalty if task is None else task / problem.inputs.shape[0] + penalty
    loss.backward()
    reg.remove()
    unused = [n for n, p in problem.model.named_parameters() if p.requires_grad and p.grad is None]
    return {
        "unused": unused,
        "grads": _grads(problem.model),
        "penalty": float(penalty.detach()),
        "task": task is not None,
    }


# ---------------------------------------------------------------------- result
@dataclass
class VerifyResult:
    """The comparison of the 1-rank and W-rank gradients."""

    target: str
    nproc: int
    sync: str
    dtype: str
    tol: float
    shard_sizes: list[int]
    task: bool
    penalty_1: float
    penalty_w: float
    rows: list[tuple[str, tuple[int, ...], float, float]] = field(default_factory=list)

    @property
    def max_abs(self) -> float:
        return max((r[3] for r in self.rows), default=0.0)

    @property
    def scale(self) -> float:
        return max((r[2] for r in self.rows), default=0.0)

    @property
    def max_rel(self) -> float:
        return self.max_abs / self.scale if self.scale > 0 else (0.0 if self.max_abs == 0 else float("inf"))

    @property
    def passed(self) -> bool:
        return self.max_rel <= self.tol

    def format(self) -> str:
        """The human-readable report printed by ``actreg verify``."""
        loss = "cross-entropy + reg.loss()" if self.task else "reg.loss()"
        lines = [
            f"actreg verify {self.target}: gradients of {loss}, {self.dtype}",
            f"  1 rank (whole batch of {sum(self.shard_sizes)}) vs {self.nproc} ranks "
            f"(DDP, shards {self.shard_sizes}, sync={self.sync!r})",
            "",
        ]
        width = max([len(r[0]) for r in self.rows] + [9])
        lines.append(
            f"  {'parameter':<{width}}  {'shape':<12} {'max|g_1|':>10} {'max|g_W-g_1|':>13} {'rel':>9}"
        )
        for name, shape, ref, diff in self.rows:
            rel = diff / ref if ref > 0 else 0.0
            lines.append(f"  {name:<{width}}  {tuple(shape)!s:<12} {ref:>10.3e} {diff:>13.3e} {rel:>9.2e}")
        lines += [
            "",
            f"  penalty value: 1 rank {self.penalty_1:.10g}, "
            f"{self.nproc} ranks (rank 0) {self.penalty_w:.10g}",
            f"  largest gradient difference: {self.max_abs:.3e} absolute, {self.max_rel:.3e} relative to "
            f"max|g_1| = {self.scale:.3e} (tolerance {self.tol:g})",
            f"{'PASS' if self.passed else 'FAIL'}: {self.nproc} ranks with sync={self.sync!r} "
            + (
                "match one process on the whole batch"
                if self.passed
                else "do NOT match one process on the whole batch"
            ),
        ]
        return "\n".join(lines)


def compare_gradients(
    ref: Mapping[str, Tensor], got: Mapping[str, Tensor]
) -> list[tuple[str, tuple[int, ...], float, float]]:
    """Per parameter: name, shape, ``max |g_1|``, ``max |g_W - g_1|``."""
    if set(ref) != set(got):
        raise RuntimeError(f"parameter names differ: {sorted(set(ref) ^ set(got))}")
    rows = []
    for name, r in ref.items():
        g = got[name].to(r.dtype)
        rows.append(
            (
                name,
                tuple(r.shape),
                float(r.abs().max()) if r.numel() else 0.0,
                float((g - r).abs().max()) if r.numel() else 0.0,
            )
        )
    return rows


def run_verify(
    target: str | None = None,
    *,
    nproc: int = 2,
    sync: str = "global",
    tol: float | None = None,
    dtype: str = "float64",
    task_loss: str = "auto",
    decay: float = 0.99,
) -> VerifyResult:
    """Run the check (reference here, W ranks through the elastic launcher)."""
    from .launch import launch_module

    target = target or DEFAULT_TARGET
    if nproc < 2:
        raise ValueError(f"--nproc must be >= 2 to compare with one process, got {nproc}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}")
    tol = DEFAULT_TOL[dtype] if tol is None else tol
    problem = make_problem(target, DTYPES[dtype])
    ref = reference(problem, sync=sync, decay=decay, task_loss=task_loss)
    tmp = Path(tempfile.mkdtemp(prefix="actreg-verify-"))
    try:
        result_path = tmp / "ranks.pt"
        argv = [
            "--worker",
            target,
            "--result",
            str(result_path),
            "--sync",
            sync,
            "--dtype",
            dtype,
            "--task-loss",
            task_loss,
            "--decay",
            repr(decay),
        ]
        launch_module(nproc, "actreg.demo.verify", argv)
        got = torch.load(result_path, map_location="cpu", weights_only=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return VerifyResult(
        target=target,
        nproc=nproc,
        sync=sync,
        dtype=dtype,
        tol=tol,
        shard_sizes=list(got["shard_sizes"]),
        task=bool(ref["task"]),
        penalty_1=ref["penalty"],
        penalty_w=float(got["penalty"]),
        rows=compare_gradients(ref["grads"], got["grads"]),
    )


# ---------------------------------------------------------------------- worker
def _worker(args: argparse.Namespace) -> None:
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        problem = make_problem(args.target, DTYPES[args.dtype])
        # Every rank must have built the same batch: compare a checksum.
        check = torch.stack([problem.inputs.double().sum(), problem.inputs.double().abs().sum()])
        lo_hi = torch.stack([check, -check])
        dist.all_reduce(lo_hi, op=dist.ReduceOp.MAX)
        if not torch.equal(lo_hi[0], -lo_hi[1]):
            raise RuntimeError(
                f"{args.target}() returned different batches on different ranks; it must be deterministic"
            )
        n = problem.inputs.shape[0]
        lo, hi = shard_bounds(n, world, rank)
        ddp = DistributedDataParallel(problem.model, find_unused_parameters=args.find_unused_parameters)
        reg = actreg.ActivityRegularizer(ddp, problem.penalties, sync=args.sync, decay=args.decay)
        targets = problem.targets[lo:hi] if problem.targets is not None else None
        out = ddp(problem.inputs[lo:hi])
        task = _task_loss(args.task_loss, out, targets)
        penalty = reg.loss()
        loss = penalty if task is None else task * (world / n) + penalty
        loss.backward()
        sizes = [shard_bounds(n, world, r)[1] - shard_bounds(n, world, r)[0] for r in range(world)]
        if rank == 0:
            torch.save(
                {"grads": _grads(problem.model), "penalty": float(penalty.detach()), "shard_sizes": sizes},
                args.result,
            )
        dist.barrier()
    finally:
        dist.destroy_process_group()


@record
def main(argv: Sequence[str] | None = None) -> int:
    """Worker entry point (started by :func:`run_verify`)."""
    parser = argparse.ArgumentParser(prog="python -m actreg.demo.verify", description=__doc__)
    parser.add_argument("--worker", dest="target", required=True, help="MODULE:FACTORY")
    parser.add_argument("--result", required=True, help="where rank 0 writes the gradients")
    parser.add_argument("--sync", choices=SYNC_MODES, default="global")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float64")
    parser.add_argument("--task-loss", choices=("auto", "none", "ce"), default="auto")
    parser.add_argument("--decay", type=float, default=0.99)
    parser.add_argument("--find-unused-parameters", action="store_true", help="DDP option")
    _worker(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
