"""``ActivityRegularizer``: hooks that record statistics, one exchange per step, penalties, state."""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .activity import activity_metrics, activity_statistics
from .centering import check_centered, recenter
from .errors import LayoutMismatchError, NonFiniteStatisticError, RecordingError
from .exchange import Exchange, surrogate
from .layout import ACTIVITY, Field, Layout, Slot, describe_differences, unique_labels
from .penalties import BATCH_COUNT, Penalty, nonzero
from .positions import position_mask, positions

SYNC_MODES = ("local", "global", "ema")
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")

Record = dict[str, dict[str, Tensor]]  # label -> statistics (ACTIVITY included)


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def _clean_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _as_penalties(pattern: str, value: Penalty | Sequence[Penalty]) -> list[Penalty]:
    items = [value] if isinstance(value, Penalty) else list(value)
    for p in items:
        if not isinstance(p, Penalty):
            raise TypeError(f"penalties[{pattern!r}] must be a Penalty or a list of them, got {p!r}")
        check_centered(type(p).__name__, p.centered, p.statistic_shapes(1))
    return items


def _first_tensor(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


def _add(acc: dict[str, Tensor], new: dict[str, Tensor]) -> None:
    for k, v in new.items():
        acc[k] = acc[k] + v


class ActivityRegularizer:
    """Activity penalties on a model's layers with global-batch semantics under data parallelism.

    Args:
        model: an ``nn.Module``, plain or wrapped in DDP (module names are those of the unwrapped
            model; FSDP / checkpoint / ``torch.compile`` wrapper prefixes are removed).
        penalties: ``{glob: penalty or [penalties]}``; each glob is matched with ``fnmatch``
            against ``named_modules()`` names. Every matched module is its own *slot*: its output
            (first element of a tuple output) is recorded on every call during a forward with
            autograd enabled, and its penalties are summed into :meth:`loss`. A glob matching no
            module is a ``ValueError`` unless it is listed in ``observed``.
        sync: ``"local"`` -- per-worker statistics, no communication; ``"global"`` -- statistics of
            the global batch, exact gradients; ``"ema"`` -- moving average of global statistics,
            ``E_t = decay * E_{t-1} + (1 - decay) * S_t``.
        decay: EMA decay, used by ``sync="ema"``.
        process_group: the data-parallel group (default: the default group; none initialised
            means a single process).
        observed: names recorded only through :meth:`observe` (activations that are not the
            output of a module, e.g. router logits inside a layer). A module of that name is then
            not hooked: its penalties see only what is observed.
        grad_scale: gradient scale ``g`` of the surrogate. It must equal the factor by which the
            gradient reduction divides the sum of per-rank gradients: the group size for DDP/FSDP
            averaging (the default), ``1.0`` if you all-reduce gradients with SUM yourself.
        stats_dtype: dtype of statistics and of the exchanged buffer. Default: the widest of
            float32 and the recorded activations' dtypes, agreed by all ranks on the first step.
        nonfinite: ``"raise"`` (default) a ``NonFiniteStatisticError`` on every rank, or
            ``"skip"`` the penalty (zero) for a step whose global statistics are not finite.
        activity_threshold: a unit is *active* at a position where ``|x| > activity_threshold``.
    """

    def __init__(
        self,
        model: nn.Module,
        penalties: Mapping[str, Penalty | Sequence[Penalty]],
        *,
        sync: str = "global",
        decay: float = 0.99,
        process_group: Any = None,
        observed: Iterable[str] = (),
        grad_scale: float | None = None,
        stats_dtype: torch.dtype | None = None,
        nonfinite: str = "raise",
        activity_threshold: float = 0.0,
    ) -> None:
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, got {sync!r}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if stats_dtype is not None and not stats_dtype.is_floating_point:
            raise ValueError(f"stats_dtype must be a floating dtype, got {stats_dtype}")
        self.sync = sync
        self.decay = float(decay)
        self.process_group = process_group
        self.grad_scale = grad_scale
        self.stats_dtype = stats_dtype
        self.nonfinite = nonfinite
        self.activity_threshold = float(activity_threshold)

        root = _unwrap(model)
        self._root = root
        self.layout = Layout(self._build_slots(root, penalties, list(observed)))
        self._slot_index = {s.name: i for i, s in enumerate(self.layout.slots)}
        self._handles: list[Any] = []
        modules = {_clean_name(n): m for n, m in root.named_modules() if n}
        for index, slot in enumerate(self.layout.slots):
            if slot.from_module:
                hook = self._make_hook(index)
                self._handles.append(modules[slot.name].register_forward_hook(hook))

        self._pending: dict[int, Record] = {}
        self._seen_dim: dict[int, int] = {}
        self._errors: list[str] = []
        self._masks: list[tuple[Tensor | None, str]] = []
        self._exchange: Exchange | None = None
        self._agreed = False
        self._dtype: torch.dtype | None = None
        self._device: torch.device | None = None
        self._ema: dict[tuple[str, str, str], Tensor] = {}
        self._shifts: dict[str, Tensor] = {}  # slot -> global shift of its centred statistics
        self._record_shifts: dict[int, Tensor] = {}  # slot index -> shift of this step's pending sums
        self._first_shifts: dict[int, Tensor] = {}  # shifts agreed by the first loss()
        self._step_shifts: dict[int, Tensor] = {}  # record shifts of the last loss()'s step
        self._step_recorded: set[int] = set()  # slots recorded in the last loss()'s step
        self._warned: set[int] = set()
        self._step = 0
        self._last: tuple[Tensor, Tensor, Tensor] | None = None  # (S, penalty values, total)

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _build_slots(
        root: nn.Module, penalties: Mapping[str, Penalty | Sequence[Penalty]], observed: list[str]
    ) -> list[Slot]:
        if not penalties:
            raise ValueError("penalties is empty: give at least one {pattern: penalty}")
        names = [_clean_name(n) for n, _ in root.named_modules() if n]
        per_module: dict[str, list[Penalty]] = {}
        per_observed: dict[str, list[Penalty]] = {name: [] for name in observed}
        for pattern, value in penalties.items():
            items = _as_penalties(pattern, value)
            if pattern in per_observed:
                per_observed[pattern].extend(items)
                continue
            matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
            if not matched:
                close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.3) or names[:5]
                raise ValueError(
                    f"penalty pattern {pattern!r} matches no module of {type(root).__name__}. "
                    f"Close module names: {close}. Patterns are fnmatch globs over "
                    "named_modules() names (e.g. 'encoder.layers.*.mlp'); for activations fed "
                    "through reg.observe(name, ...), list the name in observed=[...]."
                )
            for n in matched:
                # a module listed in `observed` is recorded through observe() only, not its hook
                (per_observed if n in per_observed else per_module).setdefault(n, []).extend(items)
        slots = [Slot(n, tuple(ps), unique_labels(ps), True) for n in names if (ps := per_module.get(n))]
        for name, ps in per_observed.items():
            if not ps:
                raise ValueError(f"observed name {name!r} has no penalties in the mapping")
            slots.append(Slot(name, tuple(ps), unique_labels(ps), False))
        return slots

    @property
    def slot_names(self) -> list[str]:
        """Names of the regularized slots (modules, then observed names), in buffer order."""
        return [s.name for s in self.layout.slots]

    # ------------------------------------------------------------------ recording
    def _make_hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not torch.is_grad_enabled():
                return
            x = _first_tensor(output)
            if x is None:
                self._fail(
                    index,
                    f"the output of the module is a {type(output).__name__}, not a tensor; "
                    "record the tensor you mean with reg.observe(name, tensor)",
                )
                return
            self._record(index, x, self._mask_for(self.layout.slots[index].name))

        return hook

    def observe(self, name: str, tensor: Tensor, mask: Tensor | None = None) -> None:
        """Record ``tensor`` (``[..., d]``) for the penalties registered under ``name``.

        ``mask`` (bool, broadcastable over the positions ``tensor.shape[:-1]``) drops positions
        where it is False from every statistic. Several calls in one step accumulate.
        """
        if name not in self._slot_index:
            raise ValueError(
                f"reg.observe({name!r}): no penalties are registered under that name; "
                f"known names: {self.slot_names}"
            )
        if not torch.is_grad_enabled():
            return
        self._record(self._slot_index[name], tensor, mask)

    @contextlib.contextmanager
    def mask(self, mask: Tensor | None, modules: str = "*") -> Iterator[None]:
        """Within the block, drop positions where ``mask`` is False from module recordings.

        Applies to hooked modules whose slot name matches the glob ``modules``; ``mask`` must
        broadcast over each such module's output positions (e.g. ``[batch, time]`` for outputs
        ``[batch, time, d]``). Nested blocks take precedence.
        """
        entry = (mask, modules)
        self._masks.append(entry)
        try:
            yield
        finally:
            self._masks.remove(entry)

    def _mask_for(self, name: str) -> Tensor | None:
        for mask, pattern in reversed(self._masks):
            if fnmatch.fnmatchcase(name, pattern):
                return mask
        return None

    def _fail(self, index: int, message: str) -> None:
        # Never raise inside a forward: other ranks would wait for this one in the collective.
        # The error travels in the step's buffer and is raised by loss() on every rank.
        self._errors.append(f"{self.layout.slots[index].name!r}: {message}")

    def _record(self, index: int, x: Tensor, mask: Tensor | None) -> None:
        if _in_backward():
            # Activation checkpointing recomputes the forward during backward: run the same
            # operations (around the same shift) so that the checkpoint can recompute the tensors
            # they saved, but record nothing -- the step's statistics were taken in the forward.
            if index not in self._step_recorded:
                self._warn_unrecorded(index)
            self._statistics(index, x, mask, self._step_shifts.get(index))
            return
        try:
            self._check(index, x)
            rows_shift = self._recording_shift(index, x, mask)
            record = self._statistics(index, x, mask, rows_shift)
        except Exception as err:
            self._fail(index, f"{type(err).__name__}: {err}")
            return
        self._seen_dim[index] = x.shape[-1]
        if self._device is None:
            self._device = x.device
        if index in self._pending:
            for label, stats in record.items():
                _add(self._pending[index][label], stats)
        else:
            self._pending[index] = record

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
            stacklevel=3,
        )

    def _check(self, index: int, x: Tensor) -> None:
        slot = self.layout.slots[index]
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() == 0:
            raise ValueError(f"expected a floating tensor [..., features], got {_describe(x)}")
        d = x.shape[-1]
        known = slot.dim if slot.dim is not None else self._seen_dim.get(index)
        if known is not None and d != known:
            raise ValueError(f"activation has {d} features, earlier ones had {known}")
        for p in slot.penalties:
            p.check_features(d)

    def _statistics(self, index: int, x: Tensor, mask: Tensor | None, shift: Tensor | None) -> Record:
        """Activity and penalty statistics of one activation (centred penalties around ``shift``)."""
        slot = self.layout.slots[index]
        d = x.shape[-1]
        acc = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            xa = x.to(acc)
            keep = position_mask(xa, mask)
            rows = positions(xa, keep)
            record: Record = {ACTIVITY: activity_statistics(rows, self.activity_threshold)}
            if shift is not None:
                shift = shift.to(device=xa.device, dtype=xa.dtype)
            centered_rows = None
            for label, p in zip(slot.labels, slot.penalties, strict=True):
                custom = type(p).record is not Penalty.record
                if p.centered and shift is not None:
                    if custom:
                        stats = p.record(xa - shift, keep)
                    else:
                        if centered_rows is None:
                            centered_rows = rows - shift
                        stats = p.statistics(centered_rows)
                else:
                    stats = p.record(xa, keep) if custom else p.statistics(rows)
                expected = p.statistic_shapes(d)
                if set(stats) != set(expected):
                    raise ValueError(
                        f"{p!r}.statistics() returned {sorted(stats)}, statistic_shapes() "
                        f"declares {sorted(expected)}"
                    )
                record[label] = stats
        return record

    def _recording_shift(self, index: int, x: Tensor, mask: Tensor | None) -> Tensor | None:
        """Shift of the centred statistics recorded for slot ``index`` in this step.

        The global shift when there is one; before that (a slot's first step), the mean of the
        first rows this rank records -- loss() moves those sums to a shift common to all ranks.
        """
        slot = self.layout.slots[index]
        if not slot.centered:
            return None
        shift = self._record_shifts.get(index)
        if shift is None:
            shift = self._shifts.get(slot.name)
            if shift is None:
                with torch.no_grad():
                    rows = positions(x.detach().to(torch.promote_types(x.dtype, torch.float32)), mask)
                    if rows.shape[0] > 0:
                        shift = rows.mean(0)
            if shift is not None:
                self._record_shifts[index] = shift
        return shift

    def _common_shifts(self, pending: dict[int, Record], communicate: bool) -> dict[str, Tensor]:
        """Move this rank's centred sums to the step's common shift of each slot; return those shifts.

        The common shift is the global one, else (first step) the one the first loss() agreed on,
        else the rank's own shift when nothing is summed across ranks, else zero.
        """
        used: dict[str, Tensor] = {}
        record_shifts, self._record_shifts = self._record_shifts, {}
        self._step_shifts = record_shifts  # for a checkpoint's recomputation in this backward
        for index, slot in enumerate(self.layout.slots):
            if slot.dim is None or not slot.centered:
                continue
            recorded = record_shifts.get(index)
            target = self._shifts.get(slot.name, self._first_shifts.get(index))
            if target is None:
                target = recorded if (recorded is not None and not communicate) else None
            if target is None:
                target = torch.zeros(slot.dim, dtype=self._dtype)
            record = pending.get(index)
            if record is not None and recorded is not None:
                delta = (target.to(recorded) - recorded).detach()
                for label, p in zip(slot.labels, slot.penalties, strict=True):
                    if p.centered:
                        record[label] = recenter(record[label], p.centered, delta.to(record[label]["count"]))
            used[slot.name] = target
        self._first_shifts = {}
        return used

    # ------------------------------------------------------------------ the step
    def loss(self) -> Tensor:
        """Total penalty of the statistics recorded since the last call (one collective).

        In ``global``/``ema`` mode with more than one rank, this issues exactly one
        ``all_reduce`` for all penalties of all layers (plus, on the first call, a one-time check
        that all ranks built the same layout). Backward issues none.
        """
        ex = self._get_exchange()
        communicate = self.sync != "local" and ex.world_size > 1
        if not self._agreed:
            self._agree(ex, communicate)
        elif communicate and any(s.dim is None for s in self.layout.slots):
            self._resolve_dims(ex)
        if not communicate:
            for index, d in self._seen_dim.items():
                self.layout.slots[index].dim = d
        self.layout.build()

        dtype = self._dtype
        assert dtype is not None
        device = self._buffer_device(ex)
        pending, errors = self._pending, self._errors
        self._pending, self._errors = {}, []
        self._step_recorded = set(pending)  # a checkpoint's recomputation records none of these
        shifts_used = self._common_shifts(pending, communicate)

        local = self.layout.pack(
            lambda f: pending.get(f.slot, {}).get(f.label, {}).get(f.stat), dtype, device
        )
        header = torch.tensor(
            [float(bool(errors)), float(ex.rank if errors else 0)], dtype=dtype, device=device
        )
        if communicate:
            wire = torch.cat([header, local.detach()])
            ex.sum_(wire)
            header, reduced = wire[:2], wire[2:]
            stats = surrogate(reduced, local, self._grad_scale(ex))
        else:
            reduced, stats = local.detach(), local

        if self.sync == "ema":
            previous = self.layout.pack(self._ema_lookup, dtype, device)
            stats = self.decay * previous + (1.0 - self.decay) * stats
        values = self._values(stats, self._step + 1 if self.sync == "ema" else 0)

        failed, failed_rank, bad_stats, bad_values = torch.stack(
            [
                header[0],
                header[1],
                (~torch.isfinite(reduced)).any().to(dtype),
                (~torch.isfinite(values)).any().to(dtype),
            ]
        ).tolist()
        if failed:
            self._raise_recording_error(ex, errors, int(failed), int(failed_rank))
        if bad_stats or bad_values:
            if self.nonfinite == "raise":
                raise NonFiniteStatisticError(self._nonfinite_message(ex, reduced, values))
            zero = torch.zeros((), dtype=dtype, device=device)
            self._last = (reduced, torch.zeros_like(values), zero)
            return zero

        if self.sync == "ema":
            self._step += 1
            self._ema = {
                (self.layout.slots[f.slot].name, f.label, f.stat): view.detach().clone()
                for f, view in self.layout.views(stats)
                if f.label != ACTIVITY
            }
        self._update_shifts(reduced, shifts_used)
        total = values.sum() if values.numel() else torch.zeros((), dtype=dtype, device=device)
        self._last = (reduced, values.detach(), total.detach())
        return total

    def _values(self, stats: Tensor, ema_step: int) -> Tensor:
        views = self.layout.unpack(stats)
        values = []
        for index, slot in enumerate(self.layout.slots):
            if slot.dim is None:
                values.extend(stats.new_zeros(()) for _ in slot.penalties)
                continue
            for label, p in zip(slot.labels, slot.penalties, strict=True):
                s = dict(views[(index, label)])
                if ema_step and "count" in s:
                    s[BATCH_COUNT] = s["count"] / (1.0 - self.decay**ema_step)
                values.append(p.value(s).reshape(()).to(stats.dtype))
        if not values:
            return stats.new_zeros(0)
        return torch.stack(values)

    def _update_shifts(self, reduced: Tensor, used: dict[str, Tensor]) -> None:
        """Next step's shift of each centred slot: this step's global mean (kept if it saw nothing).

        Moving averages taken around this step's shift are moved to the new one, exactly.
        """
        views = self.layout.unpack(reduced)
        for index, slot in enumerate(self.layout.slots):
            if slot.name not in used:
                continue
            act = views[(index, ACTIVITY)]
            old = used[slot.name].to(device=act["sum"].device, dtype=act["sum"].dtype)
            new = torch.where(act["count"] > 0, act["sum"] / nonzero(act["count"]), old)
            self._shifts[slot.name] = new
            if self.sync != "ema":
                continue
            delta = new - old
            for label, p in zip(slot.labels, slot.penalties, strict=True):
                keys = [(slot.name, label, stat) for stat in p.statistic_shapes(slot.dim)]
                if not p.centered or not all(k in self._ema for k in keys):
                    continue
                moved = recenter({k[2]: self._ema[k] for k in keys}, p.centered, delta)
                self._ema.update({(slot.name, label, stat): t for stat, t in moved.items()})

    def _ema_lookup(self, f: Field) -> Tensor | None:
        if f.label == ACTIVITY:
            return None
        return self._ema.get((self.layout.slots[f.slot].name, f.label, f.stat))

    def _grad_scale(self, ex: Exchange) -> float:
        return float(ex.world_size) if self.grad_scale is None else float(self.grad_scale)

    def _get_exchange(self) -> Exchange:
        if self._exchange is None:
            self._exchange = Exchange(self.process_group)
        return self._exchange

    def _buffer_device(self, ex: Exchange) -> torch.device:
        wanted = ex.device()
        if wanted is not None:
            return wanted
        if self._device is not None:
            return self._device
        for p in self._root.parameters():
            return p.device
        return torch.device("cpu")

    def _preferred_dtype(self) -> torch.dtype:
        if self.stats_dtype is not None:
            return self.stats_dtype
        dtype = torch.float32
        for record in self._pending.values():
            for stats in record.values():
                for t in stats.values():
                    dtype = torch.promote_types(dtype, t.dtype)
        return dtype

    def _description(self) -> dict[str, object]:
        return {
            "sync": self.sync,
            "decay": self.decay if self.sync == "ema" else None,
            "grad_scale": self.grad_scale,
            "stats_dtype": str(self.stats_dtype),
            "activity_threshold": self.activity_threshold,
            "slots": self.layout.describe(),
        }

    def _agree(self, ex: Exchange, communicate: bool) -> None:
        """First call: all ranks check they built the same layout and agree on sizes and dtype."""
        local_shifts = {
            i: (float(self._pending[i][ACTIVITY]["count"]), shift.detach().double().cpu().tolist())
            for i, shift in self._record_shifts.items()
            if i in self._pending
        }
        mine = (
            self._description(),
            [self._seen_dim.get(i) for i in range(len(self.layout.slots))],
            str(self._preferred_dtype()),
            local_shifts,
        )
        everyone = ex.gather_objects(mine) if communicate else [mine]
        descriptions = [e[0] for e in everyone]  # type: ignore[index]
        if any(d != descriptions[0] for d in descriptions):
            raise LayoutMismatchError(
                f"[actreg, {ex.who}] ranks built different ActivityRegularizers; the same "
                "patterns, penalties and settings are needed on every rank of the group:\n"
                + describe_differences(descriptions)
            )
        dims_per_rank = [e[1] for e in everyone]  # type: ignore[index]
        for index, slot in enumerate(self.layout.slots):
            seen = {dims[index] for dims in dims_per_rank} - {None}
            if len(seen) > 1:
                by_rank = {r: dims[index] for r, dims in enumerate(dims_per_rank) if dims[index] is not None}
                raise LayoutMismatchError(
                    f"[actreg, {ex.who}] {slot.name!r} has different feature sizes on different "
                    f"ranks: {by_rank}"
                )
            if seen:
                slot.dim = seen.pop()
        dtypes = [getattr(torch, e[2].replace("torch.", "")) for e in everyone]  # type: ignore[index]
        dtype = torch.float32
        for dt in dtypes:
            dtype = torch.promote_types(dtype, dt)
        self._dtype = dtype
        # first step of centred slots: the count-weighted mean of the ranks' own shifts
        per_slot: dict[int, list[tuple[float, list[float]]]] = {}
        for e in everyone:
            for i, (n, shift) in e[3].items():  # type: ignore[index]
                per_slot.setdefault(i, []).append((n, shift))
        for i, entries in per_slot.items():
            total = sum(n for n, _ in entries)
            if total > 0 and all(len(c) == self.layout.slots[i].dim for _, c in entries):
                weighted = sum(n * torch.tensor(c, dtype=torch.float64) for n, c in entries) / total
                self._first_shifts[i] = weighted.to(dtype)
        self._agreed = True

    def _resolve_dims(self, ex: Exchange) -> None:
        """Agree on the feature sizes of slots that had not run on any rank before this step.

        Only called while such slots exist; the set is identical on all ranks by construction.
        """
        unresolved = [i for i, s in enumerate(self.layout.slots) if s.dim is None]
        big = 2**40
        seen = [self._seen_dim.get(i) for i in unresolved]
        t = torch.tensor(
            [d or 0 for d in seen] + [-(d or big) for d in seen],
            dtype=torch.int64,
            device=self._buffer_device(ex),
        )
        ex.max_(t)
        k = len(unresolved)
        top, low = t[:k].tolist(), (-t[k:]).tolist()
        for i, hi, lo in zip(unresolved, top, low, strict=True):
            if hi == 0:
                continue
            if hi != lo:
                raise LayoutMismatchError(
                    f"[actreg, {ex.who}] {self.layout.slots[i].name!r} has different feature sizes "
                    f"on different ranks (between {lo} and {hi})"
                )
            self.layout.slots[i].dim = hi

    def _raise_recording_error(self, ex: Exchange, errors: list[str], failed: int, failed_rank: int) -> None:
        if errors:
            detail = "; ".join(errors)
            raise RecordingError(f"[actreg, {ex.who}] recording failed on this rank: {detail}")
        where = f"rank {failed_rank}" if failed == 1 else f"{failed} ranks"
        raise RecordingError(
            f"[actreg, {ex.who}] recording failed on {where} (see the error on that rank); all "
            "ranks stop at this step so that none waits for the others"
        )

    def _nonfinite_message(self, ex: Exchange, reduced: Tensor, values: Tensor) -> str:
        bad = sorted(
            {
                self.layout.slots[f.slot].name
                for f, v in self.layout.views(reduced)
                if not torch.isfinite(v).all()
            }
        )
        labels = [f"{s.name}/{lab}" for s in self.layout.slots for lab in s.labels]
        bad_values = [labels[i] for i, v in enumerate(values.tolist()) if v != v or abs(v) == float("inf")]
        return (
            f"[actreg, {ex.who}] non-finite global statistics for {bad} / penalty values {bad_values}; "
            "look for exploding activations or a bad learning rate, or pass nonfinite='skip' to "
            "drop the penalty on such steps"
        )

    # ------------------------------------------------------------------ observability
    def metrics(self) -> dict[str, float]:
        """Figures of the last :meth:`loss` call, from its collective (no extra communication).

        Keys: ``"<slot>/<penalty label>"`` (penalty value; EMA value in ``ema`` mode, per-worker
        in ``local`` mode), ``"<slot>/count"``, ``"<slot>/mean_abs"``, ``"<slot>/rms"``,
        ``"<slot>/active_fraction"``, ``"<slot>/dead_units"`` (of the current step's global batch,
        or of the local shard in ``local`` mode), and ``"total"``.
        """
        if self._last is None:
            return {}
        reduced, values, total = self._last
        keys: list[str] = []
        tensors: list[Tensor] = []
        views = self.layout.unpack(reduced)
        position = 0
        for index, slot in enumerate(self.layout.slots):
            for label in slot.labels:
                keys.append(f"{slot.name}/{label}")
                tensors.append(values[position])
                position += 1
            if slot.dim is not None:
                for key, t in activity_metrics(views[(index, ACTIVITY)]).items():
                    keys.append(f"{slot.name}/{key}")
                    tensors.append(t)
        keys.append("total")
        tensors.append(total)
        return dict(
            zip(keys, torch.stack([t.reshape(()).to(total.dtype) for t in tensors]).tolist(), strict=True)
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """State (identical on every rank): ``{"version", "sync", "decay", "step", "ema", "shift"}``.

        ``ema`` maps slot name -> penalty label -> statistic -> tensor of *global* sums, so it
        does not depend on the world size; ``shift`` maps slot name -> the shift around which its
        centred statistics are taken (see :mod:`actreg.centering`).
        """
        ema: dict[str, dict[str, dict[str, Tensor]]] = {}
        for (slot, label, stat), t in self._ema.items():
            ema.setdefault(slot, {}).setdefault(label, {})[stat] = t.detach().clone()
        return {
            "version": 1,
            "sync": self.sync,
            "decay": self.decay,
            "step": self._step,
            "ema": ema,
            "shift": {slot: t.detach().clone() for slot, t in self._shifts.items()},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (saved at any world size)."""
        if state_dict.get("version") != 1:
            raise ValueError(f"unsupported actreg state version {state_dict.get('version')!r}")
        known = {s.name: set(s.labels) for s in self.layout.slots}
        ema: dict[tuple[str, str, str], Tensor] = {}
        for slot, per_label in state_dict["ema"].items():
            for label, stats in per_label.items():
                if label not in known.get(slot, set()):
                    raise ValueError(
                        f"state has EMA statistics for {slot}/{label}, which this regularizer does "
                        f"not have (slots: {sorted(known)})"
                    )
                for stat, t in stats.items():
                    ema[(slot, label, stat)] = t.detach().clone()
        self._ema = ema
        self._step = int(state_dict["step"])
        self._shifts = {slot: t.detach().clone() for slot, t in state_dict.get("shift", {}).items()}

    # ------------------------------------------------------------------ lifetime
    def remove(self) -> None:
        """Remove every hook; recorded but unused statistics are dropped."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()

    def __enter__(self) -> ActivityRegularizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        slots = ", ".join(f"{s.name}: {list(s.penalties)}" for s in self.layout.slots)
        return f"ActivityRegularizer(sync={self.sync!r}, slots={{{slots}}})"


def _in_backward() -> bool:
    """Whether autograd's engine is running (e.g. a checkpoint recomputing its forward)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
