"""``actreg verify``: are W ranks' gradients those of one process on the whole batch?

``MODULE:FACTORY`` names a zero-argument callable returning ``(model, batch, penalties)``: an
``nn.Module``, the batch (``inputs`` or ``(inputs, targets)``, split along dim 0) and the
``ActivityRegularizer`` penalties mapping. The check:

1. in this process (world size 1): gradients of ``task + reg.loss()`` on the whole batch;
2. W ranks (elastic launch, gloo): the model in DDP, each rank on its contiguous share of the batch
   (shards differ by one sample when the batch does not divide), ``ActivityRegularizer(...,
   sync=SYNC)``, the gradients of ``task * W / N + reg.loss()`` after DDP's averaging;
3. ``max |g_W - g_1| / max |g_1|`` over all parameters against ``--tol``: PASS or FAIL.

A parameter that gets no gradient in the one-process run (a layer after the last regularized one,
without a task loss) is frozen (``requires_grad=False``) in the W-rank run and reported as "no
gradient in either run": DDP would otherwise wait for its gradient and average none of the
gradients in its bucket, leaving each rank's local ones to be compared. If the factory (importing
its module, calling it) or the model's forward or backward raises, :class:`FactoryError` says so,
with the user's traceback: exit code 3, not FAIL.

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
import os
import re
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import actreg
from actreg.modes import SYNC_MODES

from .data import shard_bounds
from .distributed import finish, init_distributed, run_worker

DEFAULT_TARGET = "actreg.demo.model:verify_factory"
DTYPES = {"float64": torch.float64, "float32": torch.float32}
DEFAULT_TOL = {"float64": 1e-6, "float32": 1e-4}
#: Exit status of ``actreg verify`` (and of its workers) when the user's factory or model raised.
FACTORY_RAISED = 3
_PACKAGE_DIR = str(Path(actreg.__file__).resolve().parent)


class FactoryError(Exception):
    """The user's code raised: importing the factory's module, the factory, the model's forward/backward."""


def _user_error(what: str, err: BaseException) -> FactoryError:
    """What raised, the exception, and the traceback of the user's code (actreg's frames left out)."""
    frames = [
        f
        for f in traceback.extract_tb(err.__traceback__)
        if not str(Path(f.filename).resolve()).startswith(_PACKAGE_DIR)
    ]
    tb = "".join(traceback.format_list(frames)).rstrip()
    detail = "".join(traceback.format_exception_only(type(err), err)).strip()
    return FactoryError(f"{what} raised {detail}" + (f"\nTraceback of your code:\n{tb}" if tb else ""))


def _user_code(what: str, fn: Callable[[], Any]) -> Any:
    """``fn()``; an exception from it becomes a :class:`FactoryError` naming ``what``."""
    try:
        return fn()
    except Exception as err:
        raise _user_error(what, err) from err


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
        loader = spec.loader
        _user_code(f"importing {path}", lambda: loader.exec_module(module))
    else:
        if "" not in sys.path:
            sys.path.insert(0, "")  # the current directory, as for `python -m`
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"{target!r}: cannot import {module_name!r}: {err}") from None
        except Exception as err:
            raise _user_error(f"importing {module_name}", err) from err
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
    made = _user_code(f"your factory {target}()", factory)
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


def _grads(model: nn.Module, frozen: Sequence[str] = ()) -> dict[str, Tensor]:
    """Every trainable (or ``frozen``) parameter's gradient; zeros where there is none."""
    return {
        n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)).cpu()
        for n, p in model.named_parameters()
        if p.requires_grad or n in frozen
    }


def _without_grad(model: nn.Module, frozen: Sequence[str] = ()) -> list[str]:
    """The trainable (or ``frozen``) parameters that have no gradient."""
    return [n for n, p in model.named_parameters() if (p.requires_grad or n in frozen) and p.grad is None]


def _check_recorded(reg: actreg.ActivityRegularizer) -> None:
    """Raise :class:`FactoryError` (exit code 3) if a regularized module's output could not be recorded.

    ``reg.loss()`` never raises for the step it computes: a module whose output actreg cannot
    regularize (integers, not a tensor, no features) gives a zero penalty, with no gradient, and the
    error waits for the next call. Without this check ``verify`` would compare the task loss alone
    (a PASS that checked no penalty) or blame the backward ("does not require grad").
    """
    try:
        reg.check()
    except actreg.RecordingError as err:
        text = re.sub(r"^\[actreg, [^\]]*\] recording failed on this rank in step \d+: ", "", str(err))
        raise FactoryError(
            f"a regularized module of your model outputs what actreg cannot regularize: {text}. "
            "Put the penalty on a module whose output is a floating-point tensor [..., features] "
            "(e.g. the one before a rounding or an argmax)"
        ) from None


def reference(problem: Problem, *, sync: str, decay: float, task_loss: str) -> dict[str, Any]:
    """Gradients in this process on the whole batch (world size 1)."""
    if dist.is_available() and dist.is_initialized():
        raise RuntimeError("the reference must run outside torch.distributed")
    reg = actreg.ActivityRegularizer(problem.model, problem.penalties, sync=sync, decay=decay)
    out = _user_code("the model's forward", lambda: problem.model(problem.inputs))
    task = _task_loss(task_loss, out, problem.targets)
    penalty = reg.loss()
    _check_recorded(reg)
    loss = penalty if task is None else task / problem.inputs.shape[0] + penalty
    _user_code("the backward through the model", loss.backward)
    reg.remove()
    return {
        "unused": _without_grad(problem.model),
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
    #: Parameters without a gradient in both runs (nothing to compare: they pass).
    no_grad: list[str] = field(default_factory=list)
    #: A note from the launcher (a crash in the workers' teardown after the result was written).
    note: str | None = None

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
            if name in self.no_grad:
                lines.append(f"  {name:<{width}}  {tuple(shape)!s:<12} {'no gradient in either run':>34}")
                continue
            rel = diff / ref if ref > 0 else 0.0
            lines.append(f"  {name:<{width}}  {tuple(shape)!s:<12} {ref:>10.3e} {diff:>13.3e} {rel:>9.2e}")
        lines.append("")
        if self.no_grad:
            lines.append(
                f"  {len(self.no_grad)} parameter(s) get no gradient from this loss in either run "
                "(nothing in it depends on them)"
            )
        lines += [
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
    """Run the check (reference here, W ranks through the elastic launcher).

    Raises ``ValueError`` (usage), :class:`FactoryError` (the user's code raised, here or in a
    worker), :class:`~actreg.demo.launch.WorkerFailedError` or :class:`~actreg.demo.launch.Interrupted`.
    """
    from .launch import WorkerFailedError, launch_module

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
        if ref["unused"]:
            argv += ["--frozen", ",".join(ref["unused"])]
        try:
            note = launch_module(nproc, "actreg.demo.verify", argv)
        except WorkerFailedError as err:
            if FACTORY_RAISED in err.exit_codes.values():
                raise FactoryError(f"your code raised in a worker: {err}") from None
            raise
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
        no_grad=sorted(set(ref["unused"]) & set(got["unused"])),
        note=note,
    )


# ---------------------------------------------------------------------- worker
def _worker(args: argparse.Namespace) -> int:
    from torch.nn.parallel import DistributedDataParallel

    ctx = init_distributed("gloo")
    rank, world = ctx.rank, ctx.world_size
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
    frozen = [n for n in args.frozen.split(",") if n]
    for name, p in problem.model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)  # no gradient in the reference: DDP must not wait for one
    ddp = DistributedDataParallel(problem.model, find_unused_parameters=args.find_unused_parameters)
    reg = actreg.ActivityRegularizer(ddp, problem.penalties, sync=args.sync, decay=args.decay)
    targets = problem.targets[lo:hi] if problem.targets is not None else None
    out = _user_code("the model's forward", lambda: ddp(problem.inputs[lo:hi]))
    task = _task_loss(args.task_loss, out, targets)
    penalty = reg.loss()
    _check_recorded(reg)  # raises on every rank when one could not record (exit code 3)
    loss = penalty if task is None else task * (world / n) + penalty
    _user_code("the backward through the model", loss.backward)
    sizes = [shard_bounds(n, world, r)[1] - shard_bounds(n, world, r)[0] for r in range(world)]
    if rank == 0:
        result = {
            "grads": _grads(problem.model, frozen),
            "unused": _without_grad(problem.model, frozen),
            "penalty": float(penalty.detach()),
            "shard_sizes": sizes,
        }
        tmp = Path(f"{args.result}.tmp{os.getpid()}")
        torch.save(result, tmp)
        os.replace(tmp, args.result)
    finish(ctx)
    return 0


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
    parser.add_argument("--frozen", default="", help="parameters without a gradient in the reference")
    args = parser.parse_args(argv)
    return run_worker("verify", lambda: _worker(args), exit_codes={FactoryError: FACTORY_RAISED})


if __name__ == "__main__":
    sys.exit(main())
