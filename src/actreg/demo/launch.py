"""Start W local worker processes with ``torch.distributed``'s elastic launcher (as ``torchrun``).

``launch_module(W, "actreg.demo.train", argv)`` is what

    torchrun --nproc-per-node W --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT \\
        -m actreg.demo.train ARGV...

does: one elastic agent (this process), a c10d rendezvous on a free local port, W workers running
``python -m MODULE ARGV`` with ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/... set. Workers inherit
stdout/stderr, so rank 0's progress bar shows in the terminal.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
import uuid
from collections.abc import Sequence

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch


class WorkerFailedError(RuntimeError):
    """A worker process exited with an error (its traceback was printed by the launcher)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_command(nproc: int, module: str, argv: Sequence[str]) -> str:
    """The equivalent single-node ``torchrun`` command line (for docs and reports)."""
    return shlex.join(["torchrun", "--nproc-per-node", str(nproc), "-m", module, *argv])


def launch_module(nproc: int, module: str, argv: Sequence[str], *, threads_per_worker: int = 1) -> None:
    """Run ``python -m module argv`` as ``nproc`` ranks on this machine; raise if any fails.

    ``OMP_NUM_THREADS`` is set to ``threads_per_worker`` for the workers unless already set.
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
    )
    try:
        elastic_launch(config, sys.executable)("-u", "-m", module, *argv)
    except ChildFailedError as err:
        failures = "; ".join(f"rank {rank}: exit code {f.exitcode}" for rank, f in err.failures.items())
        raise WorkerFailedError(f"{module} failed ({failures}); see the worker output above") from None
