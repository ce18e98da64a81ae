"""A pool of gloo worker processes reused across test cases (a torch import costs seconds).

``WorkerPool(world_size)`` starts ``world_size`` processes that join one gloo process group and then
run tasks: ``pool.run(fn, *args)`` calls ``fn(rank, world_size, *args)`` on every rank and returns
the per-rank results in rank order. ``fn`` must be importable (a top-level function of a module on
``sys.path``). A rank that raises returns a ``RemoteError`` (re-raised by ``run`` unless
``expect_errors=True``). A task that does not finish within its timeout kills the pool, which is
restarted on the next call, so a hang fails one test instead of the whole suite.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import queue
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class RemoteError:
    rank: int
    type_name: str
    message: str
    traceback: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, tasks: Any, results: Any) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    while True:
        task = tasks.get()
        if task is None:
            break
        module, name, args = task
        try:
            fn = getattr(importlib.import_module(module), name)
            results.put((rank, True, fn(rank, world_size, *args)))
        except BaseException as err:
            results.put(
                (rank, False, RemoteError(rank, type(err).__name__, str(err), traceback.format_exc()))
            )
    dist.destroy_process_group()


class WorkerPool:
    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._procs: list[Any] = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = _free_port()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_worker, args=(r, self.world_size, port, self._tasks[r], self._results), daemon=True
            )
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()

    def run(
        self, fn: Callable[..., Any], *args: Any, timeout: float = 180.0, expect_errors: bool = False
    ) -> list[Any]:
        if not self._procs or not all(p.is_alive() for p in self._procs):
            self.close()
            self._start()
        for q in self._tasks:
            q.put((fn.__module__, fn.__name__, args))
        out: list[Any] = [None] * self.world_size
        try:
            for _ in range(self.world_size):
                rank, _ok, value = self._results.get(timeout=timeout)
                out[rank] = value
        except queue.Empty:
            self.close()
            raise TimeoutError(
                f"{fn.__name__} did not finish on all {self.world_size} ranks in {timeout}s"
            ) from None
        errors = [v for v in out if isinstance(v, RemoteError)]
        if errors and not expect_errors:
            raise AssertionError("\n".join(f"rank {e.rank}: {e.traceback}" for e in errors))
        return out

    def close(self) -> None:
        for q in getattr(self, "_tasks", []):
            try:
                q.put(None)
            except Exception:
                pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        self._procs = []
