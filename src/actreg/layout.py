"""Where each statistic of each regularized slot sits in the step's flat buffer.

The layout is fixed when the regularizer is built (slots and penalties) and when the feature size
of a slot becomes known (agreed across ranks on the first ``loss()``); :class:`Layout` is the one
writer of feature sizes. Each slot owns one contiguous *block* (see :mod:`actreg.statistics`): the
primitives of the fused kernel, then the statistics of penalties that record their own. A slot that
did not run this step contributes zeros, so every rank always sends a buffer of the same size and
order.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .penalty import Penalty
from .statistics import ELEMENTS, BlockSpec

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
#: the step buffer starts with a header: [NaN if this rank failed to record else 0, failed ranks,
#: failing rank, failing slot] -- summed like the statistics, so every rank learns of a failure
HEADER = 4


@dataclass
class Slot:
    """One regularized activation: a module's output or a name fed through ``observe``."""

    name: str
    penalties: tuple[Penalty, ...]
    labels: tuple[str, ...]  #: metric label of each penalty, unique within the slot
    from_module: bool

    def __post_init__(self) -> None:
        #: whether any penalty of the slot takes its moments around a shift
        self.centered = any(p.centered for p in self.penalties)
        #: penalties that record their own statistics (no fused primitives), with their labels
        self.own = [
            (label, p) for label, p in zip(self.labels, self.penalties, strict=True) if not p._primitives
        ]

    def describe(self) -> tuple[str, bool, tuple[str, ...]]:
        # memory addresses (a function stored in a custom penalty) differ between processes
        return (self.name, self.from_module, tuple(_ADDRESS.sub("", repr(p)) for p in self.penalties))

    def spec(self, d: int, threshold: float, rows: int = 0) -> BlockSpec:
        """The fused primitives this slot records for ``d`` features."""
        wanted: set[str] = set()
        differentiated: set[str] = set()
        for p in self.penalties:
            prims = {ELEMENTS: "count"}
            used = {prims.get(v, v) for v in p._primitives.values()}
            wanted |= used
            differentiated |= used - {"count"}
        custom_centred = any(p.centered and not p._primitives for p in self.penalties)
        if (wanted & {"csq", "couter"} or custom_centred) and "csum" not in wanted:
            wanted.add("csum")  # the slot's shift is its global mean: needs the centred sum
        optional = frozenset(wanted - {"count", "abs_sum", "sq_sum"})
        return BlockSpec(d, optional, frozenset(differentiated), threshold, rows if "couter" in wanted else 0)


def unique_labels(penalties: Sequence[Penalty]) -> tuple[str, ...]:
    """``("L1", "L2", "L1_2")``: penalty names, numbered from the second of a kind on."""
    seen: dict[str, int] = {}
    labels = []
    for p in penalties:
        seen[p.name] = seen.get(p.name, 0) + 1
        labels.append(p.name if seen[p.name] == 1 else f"{p.name}_{seen[p.name]}")
    return tuple(labels)


@dataclass(frozen=True)
class Where:
    """A statistic's place in the buffer: ``numel`` values from ``offset``; ``scale`` multiplies
    them when read (``elements = count * d``)."""

    offset: int
    shape: tuple[int, ...]
    scale: float = 1.0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Layout:
    """Offsets of all statistics of all slots with a known feature size."""

    def __init__(self, slots: Sequence[Slot], threshold: float) -> None:
        self.slots = list(slots)
        self.threshold = threshold
        self.dims: list[int | None] = [None] * len(self.slots)
        #: slots whose Gram matrix is exchanged as rows: slot index -> rows per rank (see `exchange`)
        self.rows: dict[int, int] = {}
        self.specs: list[BlockSpec | None] = []
        self.offsets: list[int] = []  #: start of each slot's block
        self.block_sizes: list[int] = []
        self.size = 0
        self.version = 0  #: changes whenever offsets change
        self._built_for: tuple[int | None, ...] | None = None
        self.build()

    def describe(self) -> list[tuple[str, bool, tuple[str, ...]]]:
        return [s.describe() for s in self.slots]

    def set_dim(self, index: int, d: int) -> None:
        self.dims[index] = d

    @property
    def complete(self) -> bool:
        return all(d is not None for d in self.dims)

    def build(self) -> bool:
        """(Re)compute offsets; slots whose feature size is still unknown take no space.

        Returns whether anything changed.
        """
        dims = tuple(self.dims)
        if dims == self._built_for:
            return False
        self.specs, self.offsets, self.block_sizes = [], [], []
        offset = HEADER
        for slot, d in zip(self.slots, dims, strict=True):
            spec = None if d is None else slot.spec(d, self.threshold)
            size = 0 if spec is None or d is None else spec.size + self._own_size(slot, d)
            self.specs.append(spec)
            self.offsets.append(offset)
            self.block_sizes.append(size)
            offset += size
        self.size, self._built_for = offset, dims
        self.version += 1
        return True

    def record_spec(self, index: int, d: int) -> BlockSpec:
        """What a recording of slot ``index`` computes (rows in place of the Gram in rows mode)."""
        return self.slots[index].spec(d, self.threshold, self.rows.get(index, 0))

    def record_size(self, index: int) -> int:
        """Size of the block a rank records for slot ``index`` (0 while its size is unknown)."""
        d = self.dims[index]
        if d is None:
            return 0
        return self.record_spec(index, d).size + self._own_size(self.slots[index], d)

    @staticmethod
    def _own_size(slot: Slot, d: int) -> int:
        return sum(
            math.prod(shape) for _, p in slot.own for shape in p.statistic_shapes(d).values()
        )

    def where(self, index: int, label: str) -> dict[str, Where]:
        """Places of the statistics of penalty ``label`` of slot ``index`` (its size must be known)."""
        slot, spec, d = self.slots[index], self.specs[index], self.dims[index]
        assert spec is not None and d is not None
        base = self.offsets[index]
        p = slot.penalties[slot.labels.index(label)]
        shapes = p.statistic_shapes(d)
        if p._primitives:
            out = {}
            for stat, prim in p._primitives.items():
                if prim == ELEMENTS:
                    out[stat] = Where(base + spec.offsets["count"], (), float(d))
                else:
                    out[stat] = Where(base + spec.offsets[prim], tuple(shapes[stat]))
            return out
        at = base + spec.size
        for own_label, q in slot.own:
            places = {}
            for stat, shape in q.statistic_shapes(d).items():
                places[stat] = Where(at, tuple(shape))
                at += places[stat].numel
            if own_label == label:
                return places
        raise KeyError(label)

    def activity(self, index: int) -> dict[str, Where]:
        """Places of the slot's activity statistics (count, abs_sum, sq_sum, active, csum?)."""
        spec, d = self.specs[index], self.dims[index]
        assert spec is not None and d is not None
        base = self.offsets[index]
        return {name: Where(base + off, spec.shape(name)) for name, off in spec.offsets.items()}


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
