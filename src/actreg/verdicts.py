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

from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import NonFiniteStatisticError, RecordingError
from .layout import HEADER


def header(failed: bool, rank: int, slot: int, like: Tensor) -> Tensor:
    if not failed:
        return like
    return torch.tensor([float("nan"), 1.0, float(rank), float(slot)], dtype=like.dtype, device=like.device)


@dataclass
class Posted:
    step: int
    host: Tensor  #: [failed ranks, failing rank, failing slot, ok] on the host
    event: torch.cuda.Event | None
    errors: list[str]  #: this rank's own recording errors of that step
    wire: Tensor


class Verdicts:
    """The last step's decision, waiting to be read."""

    def __init__(self, nonfinite: str) -> None:
        self.nonfinite = nonfinite
        self._posted: Posted | None = None
        self._pinned: Tensor | None = None

    def post(self, step: int, wire: Tensor, ok: Tensor, errors: list[str]) -> None:
        flags = torch.cat([wire.narrow(0, 1, HEADER - 1), ok.reshape(1)])
        event = None
        if flags.device.type == "cuda":
            if self._pinned is None or self._pinned.dtype != flags.dtype:
                self._pinned = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            self._pinned.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            host = self._pinned
        else:
            host = flags
        self._posted = Posted(step, host, event, errors, wire)

    def check(self, who: str, describe: callable) -> None:  # type: ignore[valid-type]
        """Raise the posted step's error (on every rank alike); no-op when it went well."""
        posted, self._posted = self._posted, None
        if posted is None:
            return
        if posted.event is not None:
            posted.event.synchronize()
        failed, rank, slot, ok = posted.host.numpy().tolist()
        if ok:
            return
        if failed:
            if posted.errors:
                detail = "; ".join(posted.errors)
                raise RecordingError(
                    f"[actreg, {who}] recording failed on this rank in step {posted.step}: {detail}"
                )
            where = (
                f"rank {int(rank)} ({describe('slot', int(slot))})" if failed == 1 else f"{int(failed)} ranks"
            )
            raise RecordingError(
                f"[actreg, {who}] recording failed on {where} in step {posted.step} (see the error on "
                "that rank); the penalty of that step was zero and every rank stops here"
            )
        if self.nonfinite == "raise":
            raise NonFiniteStatisticError(
                f"[actreg, {who}] step {posted.step}: {describe('nonfinite', posted.wire)}; "
                "look for exploding activations or a bad learning rate, or pass nonfinite='skip' to "
                "drop the penalty on such steps (that step's penalty was zero)"
            )
