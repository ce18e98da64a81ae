"""Recording: forward hooks and ``observe`` turn activations into each slot's pending block.

The :class:`Recorder` owns everything between two ``loss()`` calls: the hooks, the mask context,
the pending blocks (one flat vector per slot; several calls in a step add up), the errors met while
recording and the feature sizes seen. A failure is **never raised in a forward**: a rank that
raised there would leave the others waiting in the collective. It is stored, travels in the step's
header and is raised by the next call on every rank.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .compiling import guard_hooks, hooks_guarded
from .layout import Layout
from .penalty import Penalty
from .positions import position_mask, require_bool_mask
from .shifts import Shifts
from .slots import match_glob
from .statistics import (
    BlockSpec,
    FiniteGradient,
    KernelThrough,
    Through,
    fused_statistics,
    fused_through,
    no_autocast,
    through_kernels,
)


@dataclass
class Records:
    """What one step recorded: blocks per slot, error messages, and the slot of the first error."""

    blocks: dict[int, Tensor] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    failed_slot: int = -1
    positions: dict[int, int] = field(default_factory=dict)  #: rows recorded per slot (masked too)


@dataclass(frozen=True)
class _Fast:
    """A slot's fast path (see :meth:`Recorder._record_fast`): valid for activations of this shape,
    dtype and device, while the layout, the statistics dtype and the loaded sizes stay as they were
    when it was set up (a plain, unmasked, uncentred module output with agreed size)."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    rows: int
    version: int
    stats_dtype: torch.dtype | None
    loaded: dict[int, int]
    through: Through


class Recorder:
    """Hooks on the regularized modules; statistics of every recorded activation."""

    def __init__(self, layout: Layout, modules: dict[str, nn.Module], shifts: Shifts) -> None:
        self.layout = layout
        self.shifts = shifts
        self.seen: dict[int, int] = {}  #: feature size each slot was recorded with on this rank
        self.dtype: torch.dtype | None = None  #: statistics dtype, once agreed (or given)
        self.device: torch.device | None = None  #: device of the first recorded activation
        self.record_eval = False  #: record modules in eval() mode too
        #: statistics through the generated kernels of actreg.fused (ActivityRegularizer(fused=))
        self.fused = False
        self.loaded_dims: dict[int, int] = {}  #: feature sizes of a loaded state (slot index -> d)
        self.recorded_last_step: set[int] = set()
        self.biases: dict[int, Tensor] = {}  #: slot index -> its expert bias (ExpertBias), live views
        self._records = Records()
        self._masks: list[tuple[Tensor | None, frozenset[str]]] = []  #: mask, names of the slots it masks
        self._matched = {"*": frozenset(s.name for s in layout.slots)}  #: reg.mask(modules=) -> names
        self._specs: dict[tuple[int, int, int, int | None], BlockSpec] = {}
        self._warned: set[int] = set()
        self._checked: set[tuple[int, int]] = set()
        self._fast: dict[int, _Fast] = {}  #: slot index -> its fast path (fused kernels only)
        for slot in layout.slots:
            takes = [p for p in slot.penalties if getattr(p, "_sequence_input", False)]
            if slot.from_module and takes:
                raise ValueError(
                    f"{takes[0]!r} on module {slot.name!r}: sequence indices reach it only through "
                    f"reg.observe({slot.name!r}, logits, mask, sequence=ids); list {slot.name!r} in "
                    "observed=[...] and observe the router logits (e.g. from a forward hook)"
                )
        # a graph compiled before these hooks existed must not be reused for these modules
        guard_hooks(reset=True, modules=[modules[s.name] for s in layout.slots if s.from_module])
        self._handles = [
            modules[slot.name].register_forward_hook(self._hook(i))
            for i, slot in enumerate(layout.slots)
            if slot.from_module
        ]

    # ------------------------------------------------------------------ entry points
    def _hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if not torch.is_grad_enabled() or not (module.training or self.record_eval):
                return None
            fast = self._fast.get(index)
            if fast is not None and type(output) is Tensor and not self._masks:
                passed = self._record_fast(index, fast, output)
                if passed is not None:
                    return passed
            x = _first_tensor(output)
            if x is None:
                self.fail(
                    index,
                    f"the output of the module is a {type(output).__name__}, not a tensor; "
                    "record the tensor you mean with reg.observe(name, tensor)",
                )
                return None
            y = self.record(index, x, self._mask_for(self.layout.slots[index].name), through=True)
            if y is None:
                return None
            # the output passes through the statistics' node (see statistics.FusedThrough)
            if isinstance(output, Tensor):
                return y
            return type(output)((y, *output[1:]))

        return hook

    def _record_fast(self, index: int, fast: _Fast, x: Tensor) -> Tensor | None:
        """Record a module output ``x`` through the slot's bound kernels (:class:`KernelThrough`):
        what :meth:`record` does for it, less the per-call decisions that :class:`_Fast` holds. None
        when anything differs from the recording the fast path was set up from (the full path
        then records): another shape, dtype or device, a second call in the step, a new layout
        or loaded state, torch.compile tracing, a checkpoint recomputing in backward."""
        records = self._records
        if (
            index in records.blocks
            or x.shape != fast.shape
            or x.dtype != fast.dtype
            or x.device != fast.device
            or fast.version != self.layout.version
            or fast.stats_dtype is not self.dtype
            or fast.loaded is not self.loaded_dims
            or not x.is_contiguous()
            or _compiling()
            or _in_backward()
        ):
            return None
        y: Tensor
        y, block = KernelThrough.apply(x, fast.through)
        records.blocks[index] = block
        records.positions[index] = fast.rows
        return y

    def _set_fast(self, index: int, x: Tensor, spec: BlockSpec, acc: torch.dtype) -> None:
        """Set up slot ``index``'s fast path from a recording of ``x`` that the full path made
        through the fused kernels: a module output, first in its step, unmasked, size agreed."""
        if self.layout.dims[index] is None or self.layout.rows.get(index, 0):
            return
        through = through_kernels(x, spec, acc)
        if through is not None:
            self._fast[index] = _Fast(
                x.shape,
                x.dtype,
                x.device,
                x.numel() // x.shape[-1],
                self.layout.version,
                self.dtype,
                self.loaded_dims,
                through,
            )

    @contextlib.contextmanager
    def mask(self, mask: Tensor | None, modules: str) -> Iterator[None]:
        require_bool_mask(mask, "reg.mask(mask)")  # here, not in the hooks: a TypeError at the call
        # matched once, not in the hooks: fnmatch cannot be traced (a graph break under torch.compile)
        names = self._matched.get(modules)
        if names is None:
            # a glob that masks nothing is a ValueError at the call, as a penalty glob matching nothing is
            matched = match_glob(
                modules,
                [s.name for s in self.layout.slots if s.from_module],
                "reg.mask(modules=...)",
                "regularized module",
                "this ActivityRegularizer",
                "The glob is matched against the modules the penalty patterns matched (reg.mask masks "
                "what their hooks record); modules='*', the default, masks them all. Activations fed "
                "through reg.observe(name, tensor, mask) take their mask there.",
            )
            names = self._matched[modules] = frozenset(matched)
        entry = (mask, names)
        self._masks.append(entry)
        try:
            yield
        finally:
            self._masks.remove(entry)

    def _mask_for(self, name: str) -> Tensor | None:
        for mask, names in reversed(self._masks):
            if name in names:
                return mask
        return None

    def fail(self, index: int, message: str) -> None:
        if self._records.failed_slot < 0:
            self._records.failed_slot = index
        self._records.errors.append(f"{self.layout.slots[index].name!r}: {message}")

    def take(self) -> Records:
        """This step's records; recording starts afresh."""
        records, self._records = self._records, Records()
        self.recorded_last_step = set(records.blocks)
        if not hooks_guarded():  # torch.compile loaded since: guard; earlier graphs refuse hooked modules
            slots = enumerate(self.layout.slots)
            guard_hooks(reset=any(s.from_module and i not in records.blocks for i, s in slots))
        return records

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._records = Records()

    # ------------------------------------------------------------------ statistics
    def record(
        self,
        index: int,
        x: Tensor,
        mask: Tensor | None,
        sequence: Tensor | None = None,
        through: bool = False,
    ) -> Tensor | None:
        """``sequence``: each position's global sequence index, for penalties that take it
        (``SequenceBalance``; ``reg.observe(..., sequence=)``). ``through`` (a module's output):
        where the fused kernels apply, return ``x`` passed through the statistics' node, for the
        module to return instead (its gradient then takes the statistics' term in the same pass);
        None otherwise."""
        # a mask from reg.observe (those of reg.mask were checked on entry): a TypeError at the call
        if mask is not None and getattr(mask, "dtype", None) is not torch.bool:
            require_bool_mask(mask, f"reg.observe({self.layout.slots[index].name!r}, tensor, mask)")
        if _in_backward():
            # Activation checkpointing recomputes the forward during backward: run the same
            # operations (around the same shift) so that the checkpoint can recompute the tensors
            # they saved, but record nothing -- the step's statistics were taken in the forward.
            if index not in self.recorded_last_step:
                self._warn_unrecorded(index)
            keep = position_mask(x, mask)
            return self._block(index, x, keep, self.shifts.last_step.get(index), 0, sequence, through)[1]
        rows = self._records.positions.get(index, 0)
        try:
            self._check(index, x)
            keep = None if mask is None else position_mask(x, mask)
            shift = self.shifts.for_recording(index, x, keep, self._acc(x))
            block, passed = self._block(index, x, keep, shift, rows, sequence, through)
        except Exception as err:
            self.fail(index, f"{type(err).__name__}: {err}")
            return None
        self._records.positions[index] = rows + x.numel() // x.shape[-1]
        self.seen[index] = x.shape[-1]
        if self.device is None:
            self.device = x.device
        blocks = self._records.blocks
        # (before the slot's size is agreed, two recordings may hold different numbers of rows)
        if index in blocks:
            block = self.layout.accumulate(index, x.shape[-1], blocks[index], block)
        blocks[index] = block
        return passed

    def _acc(self, x: Tensor) -> torch.dtype:
        return self.dtype if self.dtype is not None else torch.promote_types(x.dtype, torch.float32)

    def _block(
        self,
        index: int,
        x: Tensor,
        keep: Tensor | None,
        shift: Tensor | None,
        row: int,
        sequence: Tensor | None = None,
        through: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """The slot's block for ``x``, and (``through``, where the fused kernels apply) ``x`` passed
        through the statistics' node for the module to return instead (else None)."""
        d = x.shape[-1]
        capacity = self.layout.rows.get(index, 0)
        opened = self.layout.open_rows(index, d, row + x.numel() // d)  # (first step: rows, not the Gram)
        spec = self._specs.get((index, d, capacity, opened))
        if spec is None:
            spec = self._specs[(index, d, capacity, opened)] = self.layout.record_spec(index, d, opened)
        if capacity and row + x.numel() // d > capacity:
            raise ValueError(
                f"{row + x.numel() // d} positions in this step exceed the {capacity} rows per rank that "
                "this slot exchanges instead of its d x d Gram matrix (chosen on the first step, whose "
                "largest shard had that many positions, because the rows of all ranks are then smaller "
                "than the Gram); keep the number of positions per step at most that of the first step"
            )
        acc = self._acc(x)
        own = self.layout.slots[index].own
        if through and self.fused and not own:
            passed = fused_through(x, keep, shift if spec.centred else None, spec, acc)
            if passed is not None:
                if keep is None and row == 0 and not _in_backward():  # (through_kernels: uncentred)
                    self._set_fast(index, x, spec, acc)
                return passed[1], passed[0]
        block = fused_statistics(x, keep, shift if spec.centred else None, spec, acc, row, self.fused)
        if not own:
            return block, None
        pieces = [block]
        bias = self.biases.get(index)
        # their backward may turn a failed step's zero gradient into NaN at a non-finite x
        x = FiniteGradient.apply(x)
        xa: Tensor | None = x if x.dtype == acc else None
        with no_autocast(x):
            for _, p in own:
                if getattr(p, "_raw_input", False):
                    source = x
                else:
                    xa = x.to(acc) if xa is None else xa  # only for penalties that want it
                    source = xa
                if p.centered and shift is not None:
                    source = source - shift.to(source)
                # the slot's expert bias (ExpertBias) moves every router penalty's top-k choice
                routed = {"bias": bias} if bias is not None and getattr(p, "_routes", False) else {}
                if getattr(p, "_sequence_input", False) and sequence is not None:
                    stats = p.record_sequences(source, keep, sequence, **routed)  # type: ignore[attr-defined]
                else:
                    stats = p.record(source, keep, **routed)
                expected = p.statistic_shapes(d)
                if set(stats) != set(expected):
                    raise ValueError(
                        f"{p!r}.statistics() returned {sorted(stats)}, statistic_shapes() "
                        f"declares {sorted(expected)}"
                    )
                for name, shape in expected.items():
                    t = stats[name]
                    if tuple(t.shape) != tuple(shape):
                        raise ValueError(
                            f"statistic {name!r} of {p!r} has shape {tuple(t.shape)}, expected {tuple(shape)}"
                        )
                    pieces.append(t.reshape(-1).to(acc))
        return torch.cat(pieces), None

    def _check(self, index: int, x: Tensor) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() == 0 or x.shape[-1] == 0:
            raise ValueError(
                f"expected a floating tensor [..., features] with at least one feature, got {_describe(x)}"
            )
        d = x.shape[-1]
        known = self.layout.dims[index] if self.layout.dims[index] is not None else self.seen.get(index)
        if known is not None and d != known:
            raise ValueError(f"activation has {d} features, earlier ones had {known}")
        saved = self.loaded_dims.get(index)
        if saved is not None and d != saved:
            raise ValueError(
                f"activation has {d} features, but the state given to load_state_dict was saved with "
                f"{saved}: it belongs to another model"
            )
        if (index, d) not in self._checked:
            for p in self.layout.slots[index].penalties:
                p.check_features(d)
            self._checked.add((index, d))

    def _warn_unrecorded(self, index: int) -> None:
        if index in self._warned:
            return
        self._warned.add(index)
        warnings.warn(
            f"actreg: {self.layout.slots[index].name!r} ran during backward but was not recorded in "
            "the forward: it is probably inside torch.utils.checkpoint(..., use_reentrant=True), "
            "whose forward runs without autograd, so its penalty is missing. Use "
            "use_reentrant=False (supported), or reg.observe() its output outside the checkpoint.",
            RuntimeWarning,
            stacklevel=4,
        )


def check_sequence(name: str, sequence: object, penalties: tuple[Penalty, ...]) -> None:
    """``reg.observe(name, ..., sequence=)``: an integer tensor, for a slot that takes it."""
    if (
        not isinstance(sequence, Tensor)
        or sequence.is_floating_point()
        or sequence.is_complex()
        or sequence.dtype is torch.bool
    ):
        raise TypeError(
            f"reg.observe({name!r}, tensor, mask, sequence=...): sequence must be an integer tensor of "
            f"each position's global sequence index, got {_describe(sequence)}"
        )
    if not any(getattr(p, "_sequence_input", False) for p in penalties):
        raise ValueError(
            f"reg.observe({name!r}, ..., sequence=...): none of the penalties of {name!r} "
            f"({', '.join(map(repr, penalties))}) takes sequence indices; only SequenceBalance does"
        )


def _first_tensor(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


_GRAPH_TASK = getattr(torch._C, "_current_graph_task_id", None)


def _in_backward() -> bool:
    """Whether autograd's engine is running (e.g. a checkpoint recomputing its forward).

    Not asked while torch.compile traces a forward (the query cannot be traced: it would break the
    graph); a compiled region is not recomputed by a checkpoint in backward.
    """
    if _compiling():
        return False
    return _GRAPH_TASK is not None and _GRAPH_TASK() != -1


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
