"""The centring shifts: around which point each centred slot takes its moments (see ``centering``).

A slot's shift is its global mean of the previous step, identical on every rank, so shard sums
still add up. A slot without one yet -- on its first step, but also after a first step in which no
rank kept a position, or in which some rank's own mean was not finite -- is *pending*: each rank
records around the mean of its own first rows, and ``loss()`` moves those sums to a common shift
before the collective -- the count-weighted mean of the ranks' own shifts, computed in float64 by
the first ``loss()``'s agreement or, later, by a small agreement of its own (``agreement``). A slot
stays pending (its blocks are not moved) until that mean is agreed: kept positions on some rank
and finite. After each step :meth:`Shifts.update` takes the new shifts from the reduced buffer in a
handful of ops for all slots together, on the device, and never adopts a value that is not finite.
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
        self.first: dict[int, Tensor] = {}  #: agreed in this step for pending slots (see `pending`)
        self.last_step: dict[int, Tensor] = {}  #: shifts recorded around in the last step
        self._recorded: dict[int, Tensor] = {}
        self._flat: Tensor | None = None  #: the current shifts of `_order`, concatenated
        self._order: list[int] = []
        self._index: tuple[object, Tensor, Tensor] | None = None  #: (layout key, csum, count)
        self._centred = sum(slot.centered for slot in layout.slots)

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
        """Shifts this rank recorded around in the current step (for the agreements)."""
        return dict(self._recorded)

    def pending(self) -> list[int]:
        """Centred slots of known size without an agreed shift, in slot order.

        Identical on every rank of a communicating group: sizes are agreed, and ``current`` only
        takes shifts computed from the reduced buffer, agreed shifts or a loaded state.
        """
        layout = self.layout
        if len(self.current) == self._centred:  # (every step once all are agreed)
            return []
        return [
            i
            for i, slot in enumerate(layout.slots)
            if slot.centered and layout.dims[i] is not None and i not in self.current
        ]

    def common(self, blocks: dict[int, Tensor]) -> dict[int, Tensor]:
        """Move blocks recorded around a rank's own shift to the step's common shift of each slot.

        The common shift is the slot's current shift, else the one agreed in this step
        (``first``). A pending slot without either keeps its blocks as recorded and is left out:
        no rank kept a position of it (its sums are all 0) or one rank's own mean was not finite
        (the step's statistics are not finite, so the step fails). Returns the common shift of
        every other centred slot with a known size.
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
                continue  # still pending: its shift is agreed at a later step
            block = blocks.get(index)
            if block is not None and own is not None and own is not target:
                delta = (target.to(own) - own).detach()
                spec = layout.record_spec(index, d)  # (rows, if any, were moved by prepare_rows)
                blocks[index] = recenter_block(block, layout, index, delta.to(block.dtype), spec)
            used[index] = target
        self.first = {}
        return used

    def update(self, wire: Tensor, used: dict[int, Tensor], ok: Tensor) -> Tensor | None:
        """Next step's shifts: this step's global means ``c + csum / count``, kept as they were
        where a slot saw nothing or ``ok`` is False. Returns the concatenated shifts used in this
        step (None without centred slots).

        A shift never becomes non-finite: the shifts used are finite (agreed ones are checked,
        loaded ones validated), and ``ok`` means that the reduced buffer is finite -- ``Σx²`` of
        every slot included, so every kept ``|x|`` is far below the largest float and so is the
        mean. (No per-step ``isfinite`` is needed for it.)"""
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
        self.current.update(zip(order, new.split(dims), strict=True))
        return old

    def delta(self, old: Tensor) -> Tensor:
        """``new - old``: how far the last :meth:`update` moved the shifts (concatenated)."""
        assert self._flat is not None
        return self._flat - old

    def _gather_index(self, order: list[int], device: torch.device) -> tuple[Tensor, Tensor]:
        version = (self.layout.version, tuple(order))
        if self._index is None or self._index[0] != version:
            csum: list[int] = []
            count: list[int] = []
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
