"""Shared fixtures: pools of gloo worker processes, started once per session and reused."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from _pool import WorkerPool

os.environ.setdefault("OMP_NUM_THREADS", "1")
# fused statistics kernels (actreg.fused, opt-in) compile on first use of each layout, seconds each:
# the suite runs the eager statistics (the default) also where ACTREG_FUSED=1 is set outside, unless
# a test asks for fused=True (tests/test_fused.py); inherited by the gloo workers
os.environ.setdefault("ACTREG_FUSED", "0")


class Pools:
    def __init__(self) -> None:
        self._pools: dict[int, WorkerPool] = {}

    def __getitem__(self, world_size: int) -> WorkerPool:
        if world_size not in self._pools:
            self._pools[world_size] = WorkerPool(world_size)
        return self._pools[world_size]

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()


@pytest.fixture(scope="session")
def pools() -> Iterator[Pools]:
    p = Pools()
    yield p
    p.close()
