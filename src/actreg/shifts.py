"""The centring shifts: around which point each centred slot takes its moments (see ``centering``).

A slot's shift is its global mean of the previous step, identical on every rank, so shard sums
still add up. On a slot's first step there is none yet: each rank records around the mean of its
own first rows, and ``loss()`` moves those sums to a common shift (the count-weighted mean of the
ranks' shifts, agreed by the first ``loss()``; zero for a slot that first runs later) before the
collective. After each step :meth:`Shifts.update` takes the new shifts from the reduced buffer in a
handful of ops for all slots together, on the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .centering import recenter_block
from .layout import Layout


class Shifts:
    """Per centred slot: the shift of its statistics (slot index -> ``[d]`` tensor)."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.current: dict[int, Tensor] = {}  #: global shifts, identical on every rank
        self.first: dict[int, Tensor] = {}  #: agreed by the first loss() for slots without one
        self.last_step: dict[int, Tensor] = {}  #: shifts recorded around in the last step
        self._recorded: dict[int, Tensor] = {}
        self._flat: Tensor | None = None  #: the current shifts of `_order`, concatenated
        self._order: list[int] = []
        self._index: tuple[object, Tensor, Tensor] | None = None  #: (layout key, csum, count)

    def for_recording(self, index: int, x: Tensor, keep: Tensor | None, acc: torch.dtype) -> Tensor | None:
        """The shift to record slot ``index`` around this step (None: not centred)."""
        if not self.layout.slots[index].centered:
            return None
        shift = self._recorded.get(index)
        if shift is None:
            shift = self.current.get(index)
            if shift is None:
                shift = _own_mean(x, keep, acc)
            self._recorded[index] = shift
        return shift

    def local_shifts(self) -> dict[int, Tensor]:
        """Shifts this rank recorded around in the current step (for the first-step agreement)."""
        return dict(self._recorded)

    def common(self, blocks: dict[int, Tensor], communicate: bool) -> dict[int, Tensor]:
        """Move blocks recorded around a rank's own shift to the step's common shift of each slot.

        Returns the common shift of every centred slot with a known size.
        """
        used: dict[int, Tensor] = {}
        recorded, self._recorded = self._recorded, {}
        self.last_step = recorded  # for a checkpoint's recomputation in this backward
        layout = self.layout
        for index, slot in enumerate(layout.slots):
            d = layout.dims[index]
            if d is None or not slot.centered:
                continue
            own = recorded.get(index)
            target = self.current.get(index, self.first.get(index))
            if target is None:
                target = own if (own is not None and not communicate) else None
            if target is None:
                like = own if own is not None else next(iter(blocks.values()), None)
                target = torch.zeros(d) if like is None else like.new_zeros(d)
            block = blocks.get(index)
            if block is not None and own is not None and own is not target:
                delta = (target.to(own) - own).detach()
                blocks[index] = recenter_block(block, layout, index, delta.to(block.dtype))
            used[index] = target
        self.first = {}
        return used

    def update(self, wire: Tensor, used: dict[int, Tensor], ok: Tensor) -> Tensor | None:
        """Next step's shifts: this step's global means (kept where a slot saw nothing or ``ok`` is
        False). Returns the concatenated shifts used in this step (None without centred slots)."""
        if not used:
            return None
        order = sorted(used)
        if (
            self._flat is not None
            and order == self._order
            and all(used[i] is self.current.get(i) for i in order)
        ):
            old = self._flat
        else:
            old = torch.cat([used[i].to(device=wire.device, dtype=wire.dtype) for i in order])
        csum_at, count_at = self._gather_index(order, wire.device)
        # csum = sum (x - old) is 0 where the count is: old + csum / max(count, 1) keeps it there
        mean = old + wire.index_select(0, csum_at) / wire.index_select(0, count_at).clamp_min(1.0)
        new = torch.where(ok, mean, old)
        self._flat, self._order = new, order
        dims = [self.layout.dims[i] for i in order]
        self.current.update(zip(order, new.split(dims), strict=True))  # type: ignore[arg-type]
        return old

    def delta(self, old: Tensor) -> Tensor:
        """``new - old``: how far the last :meth:`update` moved the shifts (concatenated)."""
        assert self._flat is not None
        return self._flat - old

    def _gather_index(self, order: list[int], device: torch.device) -> tuple[Tensor, Tensor]:
        version = (self.layout.version, tuple(order))
        if self._index is None or self._index[0] != version:
            csum, count = [], []
            for i in order:
                where = self.layout.activity(i)
                csum.extend(range(where["csum"].offset, where["csum"].offset + where["csum"].numel))
                count.extend([where["count"].offset] * where["csum"].numel)
            index = torch.tensor([csum, count], dtype=torch.long, device=device)
            self._index = (version, index[0], index[1])
        return self._index[1], self._index[2]

    def state(self) -> dict[str, Tensor]:
        return {self.layout.slots[i].name: t.detach().clone() for i, t in sorted(self.current.items())}

    def load(self, state: dict[str, Tensor]) -> None:
        names = {s.name: i for i, s in enumerate(self.layout.slots)}
        self.current = {names[n]: t.detach().clone() for n, t in state.items()}
        self._flat = None


def _own_mean(x: Tensor, keep: Tensor | None, acc: torch.dtype) -> Tensor:
    """Mean of the kept rows of ``x`` (zeros if none), on the device, without autograd."""
    with torch.no_grad():
        lead = tuple(range(x.dim() - 1))
        xs = x.detach()
        if keep is None:
            return xs.sum(lead, dtype=acc) / max(x.numel() // max(x.shape[-1], 1), 1)
        xs = torch.where(keep.unsqueeze(-1), xs, 0)
        return xs.sum(lead, dtype=acc) / keep.sum(dtype=acc).clamp_min(1)
