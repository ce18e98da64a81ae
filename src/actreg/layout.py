"""Where each statistic of each penalty of each regularized layer sits in the one flat buffer.

The layout is fixed when the regularizer is built (slots and penalties) and when the feature size
of a slot becomes known (agreed across ranks on the first ``loss()``). A slot that did not run
this step contributes zeros, so every rank always sends a buffer of the same size and order.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .activity import activity_shapes
from .penalties import Penalty

ACTIVITY = "activity"  #: label of the activity block of a slot (not a penalty)
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@dataclass
class Slot:
    """One regularized activation: a module's output or a name fed through ``observe``."""

    name: str
    penalties: tuple[Penalty, ...]
    labels: tuple[str, ...]  #: metric label of each penalty, unique within the slot
    from_module: bool
    dim: int | None = None  #: feature size, agreed by all ranks (None until known)

    @property
    def centered(self) -> bool:
        """Whether any penalty of the slot takes its moments around a shift."""
        return any(p.centered for p in self.penalties)

    def describe(self) -> tuple[str, bool, tuple[str, ...]]:
        # memory addresses (a function stored in a custom penalty) differ between processes
        return (self.name, self.from_module, tuple(_ADDRESS.sub("", repr(p)) for p in self.penalties))


def unique_labels(penalties: Sequence[Penalty]) -> tuple[str, ...]:
    """``("L1", "L2", "L1_2")``: penalty names, numbered from the second of a kind on."""
    seen: dict[str, int] = {}
    labels = []
    for p in penalties:
        seen[p.name] = seen.get(p.name, 0) + 1
        labels.append(p.name if seen[p.name] == 1 else f"{p.name}_{seen[p.name]}")
    return tuple(labels)


@dataclass(frozen=True)
class Field:
    """One statistic in the flat buffer."""

    slot: int
    label: str  #: penalty label, or ``ACTIVITY``
    stat: str
    shape: tuple[int, ...]
    offset: int
    numel: int


class Layout:
    """Offsets of all statistics of all slots with a known feature size."""

    def __init__(self, slots: Sequence[Slot]) -> None:
        self.slots = list(slots)
        self.fields: list[Field] = []
        self.size = 0
        self._built_for: tuple[int | None, ...] | None = None

    def describe(self) -> list[tuple[str, bool, tuple[str, ...]]]:
        return [s.describe() for s in self.slots]

    def build(self) -> None:
        """(Re)compute offsets; slots whose feature size is still unknown take no space."""
        dims = tuple(s.dim for s in self.slots)
        if dims == self._built_for:
            return
        fields: list[Field] = []
        offset = 0
        for index, slot in enumerate(self.slots):
            if slot.dim is None:
                continue
            blocks = [(ACTIVITY, activity_shapes(slot.dim))]
            blocks += [
                (lab, p.statistic_shapes(slot.dim))
                for lab, p in zip(slot.labels, slot.penalties, strict=True)
            ]
            for label, shapes in blocks:
                for stat, shape in shapes.items():
                    numel = 1
                    for n in shape:
                        numel *= n
                    fields.append(Field(index, label, stat, tuple(shape), offset, numel))
                    offset += numel
        self.fields, self.size, self._built_for = fields, offset, dims

    def pack(
        self,
        lookup: Callable[[Field], Tensor | None],
        dtype: torch.dtype,
        device: torch.device,
    ) -> Tensor:
        """Concatenate ``lookup(field)`` for every field (zeros where it gives ``None``)."""
        pieces = []
        for f in self.fields:
            t = lookup(f)
            if t is None:
                pieces.append(torch.zeros(f.numel, dtype=dtype, device=device))
            else:
                if tuple(t.shape) != f.shape:
                    raise ValueError(
                        f"statistic {f.stat!r} of {f.label} on {self.slots[f.slot].name!r} has shape "
                        f"{tuple(t.shape)}, expected {f.shape}"
                    )
                pieces.append(t.reshape(-1).to(device=device, dtype=dtype))
        if not pieces:
            return torch.zeros(0, dtype=dtype, device=device)
        return torch.cat(pieces)

    def views(self, buffer: Tensor) -> Iterator[tuple[Field, Tensor]]:
        """Each field with its view into ``buffer``."""
        for f in self.fields:
            yield f, buffer[f.offset : f.offset + f.numel].view(f.shape)

    def unpack(self, buffer: Tensor) -> dict[tuple[int, str], dict[str, Tensor]]:
        """Views into ``buffer``: ``{(slot index, label): {stat: tensor}}``."""
        out: dict[tuple[int, str], dict[str, Tensor]] = {}
        for f, view in self.views(buffer):
            out.setdefault((f.slot, f.label), {})[f.stat] = view
        return out


def describe_differences(descriptions: Sequence[object], what: str = "layout") -> str:
    """Human-readable list of how each rank's description differs from rank 0's."""
    ref = descriptions[0]
    lines = []
    for rank, desc in enumerate(descriptions):
        if desc == ref:
            continue
        if isinstance(ref, dict) and isinstance(desc, dict):
            for key in sorted(set(ref) | set(desc), key=str):
                if ref.get(key) != desc.get(key):
                    lines.append(_diff_entry(rank, key, ref.get(key), desc.get(key)))
        else:
            lines.append(f"rank {rank} has {what} {desc!r}, rank 0 has {ref!r}")
    return "\n".join(f"  - {line}" for line in lines)


def _diff_entry(rank: int, key: object, ref: object, got: object) -> str:
    if key == "slots" and isinstance(ref, list) and isinstance(got, list):
        ref_slots = {s[0]: s for s in ref}
        got_slots = {s[0]: s for s in got}
        parts = []
        for name in sorted(set(ref_slots) - set(got_slots)):
            parts.append(f"rank {rank} does not regularize {name!r} (rank 0: {list(ref_slots[name][2])})")
        for name in sorted(set(got_slots) - set(ref_slots)):
            parts.append(f"rank {rank} regularizes {name!r} with {list(got_slots[name][2])}, rank 0 does not")
        for name in sorted(set(ref_slots) & set(got_slots)):
            if ref_slots[name] != got_slots[name]:
                parts.append(
                    f"{name!r} has penalties {list(got_slots[name][2])} on rank {rank}, "
                    f"{list(ref_slots[name][2])} on rank 0"
                )
        if not parts:
            parts.append(f"rank {rank} orders its regularized layers differently from rank 0")
        return "; ".join(parts)
    return f"{key}: {got!r} on rank {rank}, {ref!r} on rank 0"
