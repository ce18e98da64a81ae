"""The window of reduced statistics under gradient accumulation (``LoadBalance(counts="window")``).

Qwen's Algorithm 1 with a buffer, Megatron's ``global_aux_loss``: a penalty's non-differentiable
statistics (top-k counts, token counts) are summed over every ``loss()`` of an optimizer step's
window, on the device, while its differentiable ones stay those of the current ``loss()``. The
window holds the whole step buffer's worth of reduced sums (one add per ``loss()``, nothing read on
the host); each ``loss()`` reads ``window + this step's reduced statistics`` (a step whose
statistics were not finite adds nothing). It is closed -- set back to zero -- by the
once-per-optimizer-step call that also moves the expert biases (``reg.update_bias()`` or the hook of
``reg.attach(optimizer)``). When the layout changes (a slot runs for the first time), the window's
counts move to their new places; it is not part of ``state_dict()`` (save after the optimizer step).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import Layout

#: ``loss()`` calls without closing the window (``reg.update_bias()``) after which the regularizer
#: warns that none is closed: the windows of ``LoadBalance(counts="window")`` and of ``ExpertBias``
FORGOTTEN_AFTER = 512


class CountWindow:
    """Reduced statistics of the ``loss()`` calls since the window was last closed."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.active = any(
            getattr(p, "_windowed", frozenset()) for slot in layout.slots for p in slot.penalties
        )
        self.sums: Tensor | None = None  #: of the window's committed steps (wire dtype, layout size)
        self._version = -1  #: layout version of ``sums``
        self._where: dict[tuple[int, str, str], tuple[int, int]] = {}  #: places in ``sums``
        self._pending: Tensor | None = None  #: what the current step read, committed by ``commit``
        self.last: Tensor | None = None  #: what the last committed step read (for its metrics)

    def __bool__(self) -> bool:
        return self.active

    def current(self, wire: Tensor, ok: Tensor) -> Tensor:
        """``window + this step's reduced statistics`` (zeros added where ``ok`` is False). 2 ops."""
        wire = wire.detach()
        if self.sums is None or self._version != self.layout.version or self.sums.shape != wire.shape:
            self.sums = self._moved(torch.zeros_like(wire))  # (a new layout: the counts move)
            self._version, self._where = self.layout.version, self._places()
        self._pending = self.sums + torch.where(ok, wire, 0.0)
        return self._pending

    def _places(self) -> dict[tuple[int, str, str], tuple[int, int]]:
        """(slot, label, statistic) -> (offset, numel) of every windowed statistic of known size."""
        out: dict[tuple[int, str, str], tuple[int, int]] = {}
        for index, slot in enumerate(self.layout.slots):
            if self.layout.dims[index] is None:
                continue
            for label, p in zip(slot.labels, slot.penalties, strict=True):
                windowed: frozenset[str] = getattr(p, "_windowed", frozenset())
                for name, where in self.layout.where(index, label).items():
                    if name in windowed:
                        out[(index, label, name)] = (where.offset, where.numel)
        return out

    def _moved(self, fresh: Tensor) -> Tensor:
        """``fresh`` holding the window's counts at the current layout's places (device copies)."""
        if self.sums is None:
            return fresh
        for key, (at, n) in self._places().items():
            old = self._where.get(key)
            if old is not None and old[1] == n:
                fresh.narrow(0, at, n).copy_(self.sums.narrow(0, old[0], n))
        return fresh

    def commit(self) -> None:
        """The current step's statistics join the window."""
        if self._pending is None:
            return
        self.sums, self.last, self._pending = self._pending, self._pending, None

    def close(self) -> None:
        """Start a new window (once per optimizer step)."""
        self._pending = None
        if self.sums is not None:  # (a new tensor: ``last`` keeps what the last step read)
            self.sums = torch.zeros_like(self.sums)
