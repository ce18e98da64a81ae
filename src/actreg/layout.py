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

import torch
from torch import Tensor

from .penalty import Penalty
from .statistics import ELEMENTS, BlockSpec

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
#: the step buffer starts with a header: [NaN if this rank failed to record else 0, failed ranks,
#: failing rank, failing slot] -- summed like the statistics, so every rank learns of a failure
HEADER = 4
#: statistics a Gram penalty sees in place of ``outer`` when its slot's rows were gathered
#: (``"kernel"`` form): ``R R^T`` of the gathered centred rows ``R`` and ``diag(R^T R)``
KERNEL, DIAGONAL = "kernel", "diagonal"


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
        #: whether some penalty needs the Gram matrix of the centred rows (``DeCov``, ``Covariance``)
        self.gram = any("couter" in p._primitives.values() for p in self.penalties)
        #: specs built so far, by their arguments (asked for every step by the packing and the
        #: recorder: one BlockSpec each, not one per call)
        self._specs: dict[tuple[int, float, str, int, int], BlockSpec] = {}

    def describe(self) -> tuple[str, bool, tuple[str, ...]]:
        # memory addresses (a function stored in a custom penalty) differ between processes
        return (self.name, self.from_module, tuple(_ADDRESS.sub("", repr(p)) for p in self.penalties))

    def spec(self, d: int, threshold: float, form: str = "gram", rows: int = 0, kernel: int = 0) -> BlockSpec:
        """The fused primitives this slot records for ``d`` features; ``form``, ``rows``, ``kernel``:
        what its Gram matrix area holds, if it has one (see :class:`BlockSpec`)."""
        key = (d, threshold, form, rows, kernel)
        spec = self._specs.get(key)
        if spec is None:
            spec = self._specs[key] = self._spec(d, threshold, form, rows, kernel)
        return spec

    def _spec(self, d: int, threshold: float, form: str, rows: int, kernel: int) -> BlockSpec:
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
        if "couter" not in wanted:
            form, rows, kernel = "gram", 0, 0
        return BlockSpec(d, optional, frozenset(differentiated), threshold, form, rows, kernel)


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
        #: slots of ``rows`` whose reduced statistics keep the ``N x N`` kernel of the ``N`` gathered
        #: rows instead of forming the ``d x d`` Gram (``global`` mode): slot index -> ``N``
        self.kernels: dict[int, int] = {}
        self.specs: list[BlockSpec | None] = []
        self.offsets: list[int] = []  #: start of each slot's block
        self.block_sizes: list[int] = []
        self.size = 0
        self.version = 0  #: changes whenever offsets change
        self._built_for: tuple[object, ...] | None = None
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
        key = (*dims, tuple(sorted(self.kernels.items())))
        if key == self._built_for:
            return False
        self.specs, self.offsets, self.block_sizes = [], [], []
        offset = HEADER
        for index, (slot, d) in enumerate(zip(self.slots, dims, strict=True)):
            kernel = self.kernels.get(index, 0)
            form = "kernel" if kernel else "gram"
            spec = None if d is None else slot.spec(d, self.threshold, form, 0, kernel)
            size = 0 if spec is None or d is None else spec.size + self._own_size(slot, d)
            self.specs.append(spec)
            self.offsets.append(offset)
            self.block_sizes.append(size)
            offset += size
        self.size, self._built_for = offset, key
        self.version += 1
        return True

    def record_spec(self, index: int, d: int, opened: int | None = None) -> BlockSpec:
        """What a recording of slot ``index`` computes: rows in place of the Gram in rows mode, or
        ``opened`` rows (see :meth:`open_rows`)."""
        rows = self.rows.get(index, 0) if opened is None else opened
        form = "rows" if opened is not None or index in self.rows else "gram"
        return self.slots[index].spec(d, self.threshold, form, rows)

    def open_rows(self, index: int, d: int, positions: int) -> int | None:
        """Rows capacity of a recording of slot ``index`` before its size is agreed, else None.

        Until then it is not known whether the slot's Gram matrix will travel as rows (that needs
        every rank's number of positions, see ``agreement``), so a recording with fewer
        ``positions`` in this step than ``d`` keeps its centred rows and their markers (``positions *
        (d + 1)`` values, fewer than the Gram's ``d * d``): the first ``loss()`` turns them into the
        agreed form (:func:`actreg.exchange.prepare_rows`). None: record the Gram (or no Gram).
        """
        if self.dims[index] is not None or not self.slots[index].gram or positions >= d:
            return None
        return positions

    def rows_in(self, index: int, d: int, size: int) -> int | None:
        """Rows held by a block of ``size`` values recorded for slot ``index`` with ``d`` features
        in the ``"rows"`` form; None when its size is that of the ``"gram"`` form."""
        gram = self.slots[index].spec(d, self.threshold)
        area = size - gram.size - self._own_size(self.slots[index], d) + d * d
        if area == d * d:
            return None
        rows, rest = divmod(area, d + 1)
        assert rest == 0 and rows >= 0, (index, d, size)
        return rows

    def accumulate(self, index: int, d: int, total: Tensor, block: Tensor) -> Tensor:
        """``total + block``: two recordings of slot ``index`` in one step. Before the slot's size
        is agreed they may hold different numbers of rows (the later one more: rows are placed at
        the positions recorded so far), or one of them the Gram; the sum takes the larger form."""
        if total.numel() == block.numel():
            return total + block
        have, more = self.rows_in(index, d, total.numel()), self.rows_in(index, d, block.numel())
        if more is None:  # the step's positions reached d: the Gram from here on
            return self.as_gram(index, d, total) + block
        assert have is not None and have <= more, (have, more)
        return self.with_rows(index, d, total, more) + block

    def as_gram(self, index: int, d: int, block: Tensor) -> Tensor:
        """A ``"rows"`` block of slot ``index`` with its rows replaced by their Gram ``R^T R``."""
        rows = self.rows_in(index, d, block.numel())
        if rows is None:
            return block
        at = self.slots[index].spec(d, self.threshold).offsets["couter"]
        r = block.narrow(0, at, rows * d).view(rows, d)
        tail = block.numel() - at - rows * (d + 1)
        pieces = [block.narrow(0, 0, at), (r.mT @ r).reshape(-1), block.narrow(0, block.numel() - tail, tail)]
        return torch.cat(pieces)

    def with_rows(self, index: int, d: int, block: Tensor, capacity: int) -> Tensor:
        """A ``"rows"`` block of slot ``index`` zero-padded to ``capacity`` rows (and markers)."""
        rows = self.rows_in(index, d, block.numel())
        assert rows is not None and rows <= capacity, (rows, capacity)
        if rows == capacity:
            return block
        at = self.slots[index].spec(d, self.threshold).offsets["couter"]
        tail = block.numel() - at - rows * (d + 1)
        more = capacity - rows
        pieces = [
            block.narrow(0, 0, at + rows * d),
            block.new_zeros(more * d),
            block.narrow(0, at + rows * d, rows),
            block.new_zeros(more),
            block.narrow(0, block.numel() - tail, tail),
        ]
        return torch.cat(pieces)

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
                elif prim == "couter" and spec.form == "kernel":
                    # the Gram of the gathered rows R, given as R R^T and diag(R^T R) (moments.py)
                    n, at = spec.kernel, base + spec.offsets["couter"]
                    out[KERNEL] = Where(at, (n, n))
                    out[DIAGONAL] = Where(at + n * n, (d,))
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
        """Places of the slot's fused primitives (count, abs_sum, sq_sum, active, csum?, ...).

        Without ``couter`` in the ``"kernel"`` form: the gathered rows' kernel cannot be moved to
        another shift as a sum can, and the rows of a recorded block are moved before the
        exchange (:func:`actreg.exchange.prepare_rows`).
        """
        spec, d = self.specs[index], self.dims[index]
        assert spec is not None and d is not None
        base = self.offsets[index]
        return {
            name: Where(base + off, spec.shape(name))
            for name, off in spec.offsets.items()
            if not (name == "couter" and spec.form == "kernel")
        }


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
