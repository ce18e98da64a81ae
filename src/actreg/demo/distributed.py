"""Process groups and the worker protocol of the ``actreg`` command's workers.

Workers (``python -m actreg.demo.train`` / ``compare`` / ``verify``) run their body through
:func:`run_worker`, which makes three promises:

* **A failing rank stops every rank within seconds, and its error is shown.** The rank prints its
  traceback (prefixed with its rank) and leaves with ``os._exit`` -- no barrier, no
  ``destroy_process_group``, nothing that could wait for a peer. The elastic agent (``actreg``
  itself, or ``torchrun``) sees the exit and stops the other ranks; a rank that fails only because a
  peer is gone prints one line instead of a second traceback. The first failure is written to the
  launcher's directory (``ACTREG_LAUNCH_DIR``), where ``actreg`` reads it back for its error line.
* **Workers do not outlive their launcher.** Under an elastic agent a worker asks the kernel for
  ``SIGKILL`` when its parent dies (``PR_SET_PDEATHSIG`` on Linux; a watchdog thread elsewhere), so
  ``kill -9`` of ``actreg`` does not leave ranks running and writing ``--out``.
* **Interrupts end the workers at once.** ``SIGINT`` and ``SIGTERM`` take their default action
  (the process ends, even inside a collective, with no traceback); files are written atomically,
  so the last complete checkpoint stays intact. ``actreg`` prints the one line about it.

:func:`finish` ends a successful worker: rank 0 writes the *done* marker once its results are
complete, then a barrier and the group's teardown, whose crashes (gloo in torch 2.13 sometimes
aborts at exit) cannot turn a finished run into a failure: ``actreg`` sees the marker.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

#: Set by :func:`actreg.demo.launch.launch_module`: a directory for the ``done`` and ``failed`` files.
LAUNCH_DIR_ENV = "ACTREG_LAUNCH_DIR"
#: Set by the launcher: its pid, the process the workers must not outlive.
LAUNCHER_PID_ENV = "ACTREG_LAUNCHER_PID"
#: Test-only fault injection: ``abort-at-exit:RANK`` (``os.abort()`` after a finished run's teardown).
FAULT_ENV = "ACTREG_FAULT"
DONE_FILE = "done"
FAILED_FILE = "failed"
_PR_SET_PDEATHSIG = 1


# ---------------------------------------------------------------------- distributed context
@dataclass
class DistContext:
    """Where this process stands: rank, world size, device; ``distributed`` if a group exists."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str = "auto") -> DistContext:
    """Initialise the default process group from torchrun's environment (or run as one process).

    ``backend="auto"``: NCCL on GPUs when CUDA is available, gloo on CPU otherwise.
    """
    torch.set_num_threads(1)
    if "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda" if backend != "gloo" and torch.cuda.is_available() else "cpu")
        return DistContext(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = backend == "nccl" or (backend == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, True)


def shutdown_distributed(ctx: DistContext) -> None:
    """Barrier and destroy the default group, if one was created. For the success path only.

    A failure in the teardown itself (after the barrier every rank has finished) is ignored.
    """
    if ctx.distributed and dist.is_initialized():
        dist.barrier()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def gather_to_main(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's ``obj`` on rank 0 (in rank order); ``[]`` on the other ranks."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out or []


def broadcast_from_main(ctx: DistContext, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------- the worker protocol
def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _launch_dir() -> Path | None:
    value = os.environ.get(LAUNCH_DIR_ENV)
    return Path(value) if value else None


def bind_to_parent() -> None:
    """Under an elastic agent: end this process (``SIGKILL``) as soon as the agent dies."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and LAUNCHER_PID_ENV not in os.environ:
        return  # started by hand: nothing to be bound to
    parent = int(os.environ.get(LAUNCHER_PID_ENV, "0")) or os.getppid()
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(128 + int(signal.SIGKILL))
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="actreg-parent").start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(128 + int(signal.SIGKILL))


def _claim_failure(line: str) -> bool:
    """Record the run's first failure in the launch directory; False if another rank was first."""
    directory = _launch_dir()
    if directory is None:
        return True
    try:
        fd = os.open(directory / FAILED_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    except OSError:
        return True
    with os.fdopen(fd, "w") as f:
        f.write(line)
    return True


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _describe(err: BaseException) -> str:
    """One line: the exception, and the first one of its chain when it was raised while handling it."""
    if isinstance(err, SystemExit):
        return str(err.code)
    root = err
    while True:
        nxt = root.__cause__ or (None if root.__suppress_context__ else root.__context__)
        if nxt is None:
            break
        root = nxt
    return _one_line(err) if root is err else f"{_one_line(err)} (after {_one_line(root)})"


def _fail(command: str, err: BaseException, exit_code: int) -> None:
    """Show the error with the rank, record it, and leave at once (no barrier, no teardown)."""
    rank = _rank()
    summary = _describe(err)
    if _claim_failure(f"rank {rank}: {summary}"):
        if isinstance(err, SystemExit):
            text = f"actreg {command}: rank {rank} failed: {summary}\n"
        else:
            tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
            text = f"actreg {command}: rank {rank} failed:\n{tb}"
    else:
        text = f"actreg {command}: rank {rank} stopped after another rank failed ({summary})\n"
    try:
        sys.stdout.flush()
        sys.stderr.write(text)
        sys.stderr.flush()
    finally:
        os._exit(exit_code)


def run_worker(
    command: str, body: Callable[[], int], *, exit_codes: Mapping[type[BaseException], int] | None = None
) -> int:
    """Run a worker's ``body`` under the protocol of this module; returns its exit status.

    An exception (or a ``SystemExit`` with a message) ends the process at once with exit status 1,
    or the one ``exit_codes`` gives for the exception's type.
    """
    bind_to_parent()
    if "TORCHELASTIC_RUN_ID" in os.environ and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        return body()
    except SystemExit as err:
        if err.code is None or err.code == 0:
            return 0
        if isinstance(err.code, int):  # a deliberate exit status: leave with it, without a barrier
            _claim_failure(f"rank {_rank()}: exit status {err.code}")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(err.code)
        _fail(command, err, 1)
    except BaseException as err:  # every failure ends the process the same way
        code = next((c for t, c in (exit_codes or {}).items() if isinstance(err, t)), 1)
        _fail(command, err, code)
    return 1  # not reached: _fail leaves the process


def mark_done() -> None:
    """Rank 0: the results are complete (``actreg`` then ignores a crash in the teardown)."""
    directory = _launch_dir()
    if directory is not None and _rank() == 0:
        (directory / DONE_FILE).write_text("done\n")


def finish(ctx: DistContext) -> None:
    """End a worker that succeeded: the done marker (rank 0), a barrier, the group's teardown."""
    if ctx.is_main:
        mark_done()
    shutdown_distributed(ctx)
    fault = os.environ.get(FAULT_ENV, "")
    if fault == f"abort-at-exit:{ctx.rank}":
        sys.stdout.flush()
        os.abort()  # test hook: the teardown crash of gloo in torch 2.13
