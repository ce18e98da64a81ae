"""Start W local worker processes with ``torch.distributed``'s elastic launcher (as ``torchrun``).

``launch_module(W, "actreg.demo.train", argv)`` is what

    torchrun --nproc-per-node W --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT \\
        -m actreg.demo.train ARGV...

does: one elastic agent (this process), a c10d rendezvous on a free local port, W workers running
``python -m MODULE ARGV`` with ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/... set. Workers inherit
stdout/stderr, so rank 0's progress bar shows in the terminal.

The workers follow :mod:`actreg.demo.distributed`'s protocol; this side of it turns what the agent
reports into one of three outcomes: success (``None``, or a one-line note when a rank crashed in
its teardown after the results were complete), :class:`WorkerFailedError` naming the rank that
failed first and its error, or :class:`Interrupted` with the signal that stopped the run.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from .distributed import DONE_FILE, FAILED_FILE, LAUNCH_DIR_ENV, LAUNCHER_PID_ENV

#: Seconds the agent waits for stopped workers before it kills them (they stop at once: a safety net).
SHUTDOWN_TIMEOUT_S = 5
#: Signals that mean "the user stopped the run" when they end a worker.
INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


class WorkerFailedError(RuntimeError):
    """A worker process failed; the message names the rank that failed first and its error."""

    def __init__(self, message: str, exit_codes: dict[int, int]) -> None:
        super().__init__(message)
        #: Exit status of every failed rank (negative: ended by that signal).
        self.exit_codes = exit_codes


class Interrupted(Exception):
    """The run was stopped by a signal (SIGINT, SIGTERM, ...); the workers are gone."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        #: What the command adds to its one line (e.g. where to resume from).
        self.detail = ""
        super().__init__(f"interrupted by {signal.Signals(self.signum).name}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_command(nproc: int, module: str, argv: Sequence[str]) -> str:
    """The equivalent single-node ``torchrun`` command line (for docs and reports)."""
    return shlex.join(["torchrun", "--nproc-per-node", str(nproc), "-m", module, *argv])


@contextmanager
def _quiet_agent() -> Iterator[None]:
    """The agent's own log lines (which rank exited how) repeat what ``actreg`` says in one line."""
    prefix = "torch.distributed.elastic"
    names = [prefix, *(n for n in logging.root.manager.loggerDict if n.startswith(prefix + "."))]
    logs = [logging.getLogger(n) for n in names]  # each sets its own level: set them all
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _outcome(err: ChildFailedError, module: str, launch_dir: Path) -> str:
    """A worker failed: the note for a teardown crash after the results, or raise what happened."""
    codes = {int(rank): int(f.exitcode) for rank, f in err.failures.items()}
    signalled = all(code < 0 for code in codes.values())
    if signalled and (launch_dir / DONE_FILE).exists():
        stops = {-int(signal.SIGKILL), *(-int(s) for s in INTERRUPTS)}  # the agent stopping the others
        crashed = ", ".join(
            f"rank {r} ({_signal_name(c)})" for r, c in sorted(codes.items()) if c not in stops
        )
        if not crashed:
            return "note: the workers were stopped after the results were complete; nothing is lost"
        return (
            f"note: {crashed} crashed in the process-group teardown after the results were complete "
            "(a known crash of gloo at exit in torch 2.13); nothing is lost"
        )
    if all(-c in INTERRUPTS for c in codes.values()):  # stopped from outside (a rank that fails exits > 0)
        raise Interrupted(-next(iter(codes.values())))
    failed = launch_dir / FAILED_FILE
    if failed.exists():
        cause = failed.read_text().strip()
    else:
        rank, first = err.get_first_failure()
        how = _signal_name(first.exitcode) if first.exitcode < 0 else f"exit status {first.exitcode}"
        cause = f"rank {rank}: ended with {how}"
    raise WorkerFailedError(f"{module} failed on {cause} (see the worker output above)", codes)


def launch_module(
    nproc: int,
    module: str,
    argv: Sequence[str],
    *,
    threads_per_worker: int = 1,
) -> str | None:
    """Run ``python -m module argv`` as ``nproc`` ranks on this machine; raise if any fails.

    ``OMP_NUM_THREADS`` is set to ``threads_per_worker`` for the workers unless already set.
    Returns ``None``, or a one-line note when ranks crashed in their teardown after rank 0 had
    marked the results complete (:func:`actreg.demo.distributed.finish`). Raises
    :class:`WorkerFailedError` or :class:`Interrupted`.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_worker))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"actreg-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        rdzv_configs={"timeout": 120},
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
        local_addr="127.0.0.1",
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
    )
    launch_dir = Path(tempfile.mkdtemp(prefix="actreg-launch-"))
    env = {LAUNCH_DIR_ENV: str(launch_dir), LAUNCHER_PID_ENV: str(os.getpid())}
    try:
        with mock.patch.dict(os.environ, env), _quiet_agent():
            elastic_launch(config, sys.executable)("-u", "-m", module, *argv)
        return None
    except ChildFailedError as err:
        return _outcome(err, module, launch_dir)
    except SignalException as err:
        raise Interrupted(err.sigval) from None
    finally:
        shutil.rmtree(launch_dir, ignore_errors=True)
