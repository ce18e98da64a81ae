"""Decisions of a step, taken on the device and raised at the next call on every rank.

A step never reads the device from the host. Its decision -- did any rank fail to record, are the
global statistics and the penalty finite -- is a few numbers computed from the reduced buffer,
identical on every rank. They are copied to (pinned) host memory without waiting and read at the
start of the next ``loss()``, ``metrics()``, ``state_dict()`` or ``check()``; by then the step is
long done, so the read costs nothing (on a GPU more than a step behind, the next ``loss()`` waits
for that step's collective: the device still has this step's forward queued, so it does not idle).
Every rank reads the same numbers at the same call, so every rank raises together. The failed
step's penalty and gradient were zero.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import NonFiniteStatisticError, RecordingError
from .layout import HEADER


@dataclass
class Posted:
    step: int
    event: torch.cuda.Event | None
    errors: list[str]  #: this rank's own recording errors of that step
    wire: Tensor


class Verdicts:
    """The last step's decision, waiting to be read."""

    def __init__(self, nonfinite: str, slot_names: Sequence[str]) -> None:
        self.nonfinite = nonfinite
        self.slot_names = list(slot_names)  #: to name a failing rank's slot
        self._posted: Posted | None = None
        # host memory the flags are copied into: [NaN marker, failed ranks, failing rank, failing
        # slot, ok]; read back through a memoryview (pinned and filled asynchronously on a GPU)
        self._bytes = bytearray(5 * 8)
        self._host: Tensor | None = None
        self._pinned = False
        self._views: tuple[Tensor, Tensor] = (torch.empty(0), torch.empty(0))

    def post(self, step: int, wire: Tensor, ok: Tensor, errors: list[str]) -> None:
        head, flag = self._host_views(wire)
        cuda = wire.device.type == "cuda"
        head.copy_(wire[:HEADER], non_blocking=cuda)
        flag.copy_(ok, non_blocking=cuda)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        self._posted = Posted(step, event, errors, wire)

    def _host_views(self, wire: Tensor) -> tuple[Tensor, Tensor]:
        if self._host is None or self._host.dtype != wire.dtype:
            self._pinned = wire.device.type == "cuda"
            if self._pinned:
                self._host = torch.empty(HEADER + 1, dtype=wire.dtype, pin_memory=True)
            else:
                self._host = torch.frombuffer(self._bytes, dtype=wire.dtype, count=HEADER + 1)
            self._views = (self._host[:HEADER], self._host[HEADER])
        return self._views

    def _read(self) -> list[float]:
        assert self._host is not None
        if self._pinned or self._host.dtype not in (torch.float64, torch.float32):
            return self._host.tolist()  # host memory: no device synchronisation
        view = memoryview(self._bytes)
        values = view.cast("d") if self._host.dtype == torch.float64 else view.cast("f")
        return list(values[: HEADER + 1])

    def check(self, who: str, explain_nonfinite: Callable[[Tensor], str]) -> None:
        """Raise the posted step's error (on every rank alike); no-op when it went well."""
        posted, self._posted = self._posted, None
        if posted is None:
            return
        if posted.event is not None:
            while not posted.event.query():  # the device is more than a step behind: let it catch up
                time.sleep(20e-6)
        _, failed, rank, slot, ok = self._read()
        if ok:
            return
        if failed:
            if posted.errors:
                detail = "; ".join(posted.errors)
                raise RecordingError(
                    f"[actreg, {who}] recording failed on this rank in step {posted.step}: {detail}"
                )
            name = self.slot_names[int(slot)] if 0 <= slot < len(self.slot_names) else "?"
            where = f"rank {int(rank)} ({name!r})" if failed == 1 else f"{int(failed)} ranks"
            raise RecordingError(
                f"[actreg, {who}] recording failed on {where} in step {posted.step} (see the error on "
                "that rank); the penalty of that step was zero and every rank stops here"
            )
        if self.nonfinite == "raise":
            raise NonFiniteStatisticError(
                f"[actreg, {who}] step {posted.step}: {explain_nonfinite(posted.wire)}; "
                "look for exploding activations or a bad learning rate, or pass nonfinite='skip' to "
                "drop the penalty on such steps (that step's penalty was zero)"
            )
