"""The moving average of global statistics (``sync="ema"``), kept as one flat tensor.

``E_t = decay * E_{t-1} + (1 - decay) * S_hat_t`` over the whole step buffer, ``E_0 = 0``, stored
detached after the step (no graph survives a step). The update and the Bessel sample size
``E_count / (1 - decay^t)`` are computed on the device; a step that is skipped (a recording error,
non-finite statistics) leaves the average and its step count as they were. The state is converted
to and from the nested ``{slot: {penalty label: {statistic: tensor}}}`` of global sums of
``state_dict()`` only when asked, so it does not depend on how the buffer is carved.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .centering import recenter_block
from .layout import Layout, Where

Nested = dict[str, dict[str, dict[str, Tensor]]]


class MovingAverage:
    def __init__(self, layout: Layout, decay: float) -> None:
        self.layout = layout
        self.decay = decay
        self.flat: Tensor | None = None
        self.steps: Tensor | int = 0  #: committed updates (a device tensor once training runs)
        self._version = -1
        self._loaded: Nested = {}
        self._places: dict[tuple[str, str], dict[str, Where]] = {}  #: where `flat` holds what

    def blend(self, stats: Tensor) -> tuple[Tensor, Tensor]:
        """The moving average including this step, and the Bessel scale ``1 / (1 - decay^t)``."""
        if self.flat is None or self._version != self.layout.version:
            self._relayout(stats)
        assert self.flat is not None and isinstance(self.steps, Tensor)
        return torch.lerp(stats, self.flat, self.decay), self._bessel(self.steps + 1)

    def scale(self) -> Tensor:
        """The Bessel scale ``1 / (1 - decay^t)`` of the committed average."""
        assert isinstance(self.steps, Tensor)
        return self._bessel(self.steps)

    def _bessel(self, steps: Tensor) -> Tensor:
        return 1.0 / (1.0 - torch.pow(self.decay, steps))

    def commit(self, blended: Tensor, ok: Tensor) -> None:
        assert self.flat is not None and isinstance(self.steps, Tensor)
        self.flat = torch.where(ok, blended.detach(), self.flat)
        self.steps = self.steps + ok.to(self.steps.dtype)

    def recenter(self, delta: Tensor | None, order: list[int]) -> None:
        """Move the average of centred slots by ``delta`` (``new - old`` shifts, in ``order``)."""
        if delta is None or self.flat is None:
            return
        layout = self.layout
        pieces = delta.split([layout.dims[i] for i in order])
        for i, d in zip(order, pieces, strict=True):
            block = self.flat.narrow(0, layout.offsets[i], layout.block_sizes[i])  # ours: move in place
            block.copy_(recenter_block(block, layout, i, d))

    def _relayout(self, like: Tensor) -> None:
        # read the old average with the places it was written at (the layout has moved on)
        nested = self.state() if self.flat is not None else self._loaded
        self.flat = like.new_zeros(self.layout.size)
        self._version = self.layout.version
        self._places = _places(self.layout)
        if not isinstance(self.steps, Tensor):
            self.steps = torch.full((), float(self.steps), dtype=like.dtype, device=like.device)
        self._put(nested)

    def _put(self, nested: Nested) -> None:
        assert self.flat is not None
        layout = self.layout
        for index, slot in enumerate(layout.slots):
            if layout.dims[index] is None or slot.name not in nested:
                continue
            for label, stats in nested[slot.name].items():
                for stat, where in layout.where(index, label).items():
                    if stat in stats:
                        t = stats[stat].to(self.flat).reshape(-1) / where.scale
                        self.flat[where.offset : where.offset + where.numel] = t

    # ------------------------------------------------------------------ state
    def state(self) -> Nested:
        """Global sums per slot, penalty label and statistic (what ``state_dict()["ema"]`` holds)."""
        if self.flat is None:
            return {k: {lab: dict(s) for lab, s in v.items()} for k, v in self._loaded.items()}
        out: Nested = {}
        for (slot, label), places in self._places.items():
            out.setdefault(slot, {})[label] = {
                stat: (self.flat[w.offset : w.offset + w.numel].view(w.shape) * w.scale).detach().clone()
                for stat, w in places.items()
            }
        return out

    def step_count(self) -> int:
        return int(self.steps.item()) if isinstance(self.steps, Tensor) else int(self.steps)

    def load(self, nested: Nested, steps: int) -> None:
        self._loaded = {k: {lab: dict(s) for lab, s in v.items()} for k, v in nested.items()}
        self.flat = None
        self.steps = int(steps)


def _places(layout: Layout) -> dict[tuple[str, str], dict[str, Where]]:
    """(slot name, penalty label) -> statistic -> place, for every slot of known size."""
    return {
        (slot.name, label): layout.where(index, label)
        for index, slot in enumerate(layout.slots)
        if layout.dims[index] is not None
        for label in slot.labels
    }
