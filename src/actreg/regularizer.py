"""``ActivityRegularizer``: record statistics, one exchange per step, penalties, state."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .agreement import Agreement, Proposal, agree, resolve_dims
from .ema import MovingAverage
from .exchange import Exchange, Exchanged
from .layout import Layout
from .metrics import activity_figures, nonfinite_message
from .modes import mode
from .penalties import Penalty
from .recording import Recorder, Records
from .shifts import Shifts
from .slots import build_slots, named_modules, unwrap
from .values import Evaluator, build_groups
from .verdicts import Verdicts, header


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
        nonfinite: what to do with a step whose global statistics or penalty are not finite. Either
            way that step's penalty and its gradient are zero (no NaN reaches a parameter) and the
            moving average is left as it was. ``"raise"`` (default): the next :meth:`loss`,
            :meth:`metrics`, :meth:`state_dict` or :meth:`check` raises a
            ``NonFiniteStatisticError`` on every rank; ``"skip"``: never raise, count the skipped
            steps in ``metrics()["skipped_steps"]``.
        activity_threshold: a unit is *active* at a position where ``|x| > activity_threshold``.

    A step reads nothing back from the device: errors met while recording (on any rank) and
    non-finite statistics are decided from the reduced buffer and raised by the *next* call (see
    :meth:`check`).
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
        self.mode = mode(sync)
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

        self._root = unwrap(model)
        self.layout = Layout(build_slots(self._root, penalties, list(observed)), self.activity_threshold)
        self._names = {s.name: i for i, s in enumerate(self.layout.slots)}
        self.shifts = Shifts(self.layout)
        self.recorder = Recorder(self.layout, named_modules(self._root), self.shifts)
        self.recorder.dtype = stats_dtype
        self.ema = MovingAverage(self.layout, self.decay)
        self.verdicts = Verdicts(nonfinite)
        self._exchange: Exchange | None = None
        self._agreed = False
        self._evaluator: tuple[int, Evaluator] | None = None
        self._zeros: dict[tuple[int, int], Tensor] = {}
        self._header: Tensor | None = None
        self._steps = 0
        self._skipped: Tensor | None = None
        self._last: tuple[Tensor, Tensor] | None = None  # (reduced buffer, step went well)

    @property
    def slot_names(self) -> list[str]:
        """Names of the regularized slots (modules, then observed names), in buffer order."""
        return [s.name for s in self.layout.slots]

    # ------------------------------------------------------------------ recording
    def observe(self, name: str, tensor: Tensor, mask: Tensor | None = None) -> None:
        """Record ``tensor`` (``[..., d]``) for the penalties registered under ``name``.

        ``mask`` (bool, broadcastable over the positions ``tensor.shape[:-1]``) drops positions
        where it is False from every statistic. Several calls in one step accumulate.
        """
        if name not in self._names:
            raise ValueError(
                f"reg.observe({name!r}): no penalties are registered under that name; "
                f"known names: {self.slot_names}"
            )
        if torch.is_grad_enabled():
            self.recorder.record(self._names[name], tensor, mask)

    @contextlib.contextmanager
    def mask(self, mask: Tensor | None, modules: str = "*") -> Iterator[None]:
        """Within the block, drop positions where ``mask`` is False from module recordings.

        Applies to hooked modules whose slot name matches the glob ``modules``; ``mask`` must
        broadcast over each such module's output positions (e.g. ``[batch, time]`` for outputs
        ``[batch, time, d]``). Nested blocks take precedence.
        """
        with self.recorder.mask(mask, modules):
            yield

    # ------------------------------------------------------------------ the step
    def loss(self) -> Tensor:
        """Total penalty of the statistics recorded since the last call (one collective).

        In ``global``/``ema`` mode with more than one rank, this issues exactly one
        ``all_reduce`` for all penalties of all layers (plus, on the first call, a one-time check
        that all ranks built the same layout). Backward issues none. It first raises, on every
        rank, what the previous step decided (see :meth:`check`).
        """
        self.check()
        ex = self._get_exchange()
        communicate = self.mode.communicates and ex.world_size > 1
        records = self.recorder.take()
        self._settle_layout(ex, communicate, records)
        device = self._device(ex)
        dtype = self.recorder.dtype
        assert dtype is not None
        used = self.shifts.common(records.blocks, communicate)
        blocks = [self._block(records, i, dtype, device) for i in range(len(self.layout.slots))]
        g = (
            (float(ex.world_size) if self.grad_scale is None else float(self.grad_scale))
            if communicate
            else 1.0
        )
        wire = Exchanged.apply(ex, communicate, g, self._header_for(records, ex, dtype, device), *blocks)

        ok = torch.isfinite(wire).all()  # also False when a rank failed to record (NaN header)
        stats, batch_scale = self.ema.blend(wire) if self.mode.moving_average else (wire, None)
        total = self._values(dtype, device).total(torch.where(ok, stats, 0.0), batch_scale)
        ok = ok & torch.isfinite(total)
        total = torch.where(ok, total, 0.0)

        with torch.no_grad():
            if self.mode.moving_average:
                self.ema.commit(stats, ok)
            wire = wire.detach()
            old = self.shifts.update(wire, used, ok)
            if self.mode.moving_average and old is not None:
                self.ema.recenter(self.shifts.delta(old), sorted(used))
            self._steps += 1
            self.verdicts.post(self._steps, wire, ok, records.errors)
            if self.nonfinite == "skip":
                self._skipped = ~ok if self._skipped is None else self._skipped + ~ok
        self._last = (wire, ok)
        return total

    def check(self) -> None:
        """Raise, on every rank, what the last :meth:`loss` decided on the device.

        A ``RecordingError`` if some rank could not record (its own message on that rank), a
        ``NonFiniteStatisticError`` if the global statistics or penalty were not finite and
        ``nonfinite="raise"``. Called by :meth:`loss`, :meth:`metrics` and :meth:`state_dict`;
        call it yourself after the last step of a run.
        """
        ex = self._get_exchange()
        self.verdicts.check(ex.who, self._describe)

    def _settle_layout(self, ex: Exchange, communicate: bool, records: Records) -> None:
        """First call: agree across ranks. Later: resolve sizes of slots that had never run."""
        layout = self.layout
        if not self._agreed:
            self._adopt(agree(ex, self._proposal(records), communicate, layout))
        elif communicate and not layout.complete:
            resolve_dims(ex, layout, self.recorder.seen, self._device(ex))
        if not communicate:
            for index, d in self.recorder.seen.items():
                layout.set_dim(index, d)
        layout.build()

    def _proposal(self, records: Records) -> Proposal:
        dtype = self.stats_dtype or torch.float32
        for b in records.blocks.values():
            dtype = torch.promote_types(dtype, b.dtype)
        shifts = {
            i: (float(records.blocks[i][0].detach()), s.detach().double().cpu().tolist())
            for i, s in self.shifts.local_shifts().items()
            if i in records.blocks
        }
        description = {
            "sync": self.sync,
            "decay": self.decay if self.mode.moving_average else None,
            "grad_scale": self.grad_scale,
            "stats_dtype": str(self.stats_dtype),
            "activity_threshold": self.activity_threshold,
            "slots": self.layout.describe(),
        }
        dims = [self.recorder.seen.get(i) for i in range(len(self.layout.slots))]
        return Proposal(description, dims, str(dtype), shifts)

    def _adopt(self, agreement: Agreement) -> None:
        for index, d in agreement.dims.items():
            self.layout.set_dim(index, d)
        self.recorder.dtype = agreement.dtype
        self.shifts.first = agreement.first_shifts
        self._agreed = True

    def _block(self, records: Records, index: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        size = self.layout.block_sizes[index]
        block = records.blocks.get(index)
        if block is None or block.numel() != size:  # not run (or, on a failing rank, not usable)
            key = (size, id(dtype))
            zeros = self._zeros.get(key)
            if zeros is None or zeros.device != device:
                zeros = self._zeros[key] = torch.zeros(size, dtype=dtype, device=device)
            return zeros
        if block.dtype != dtype or block.device != device:
            block = block.to(device=device, dtype=dtype)
        return block

    def _header_for(self, records: Records, ex: Exchange, dtype: torch.dtype, device: torch.device) -> Tensor:
        if self._header is None or self._header.dtype != dtype or self._header.device != device:
            self._header = torch.zeros(4, dtype=dtype, device=device)
        return header(bool(records.errors), ex.rank, records.failed_slot, self._header)

    def _values(self, dtype: torch.dtype, device: torch.device) -> Evaluator:
        if self._evaluator is None or self._evaluator[0] != self.layout.version:
            self._evaluator = (self.layout.version, Evaluator(build_groups(self.layout), device, dtype))
        return self._evaluator[1]

    def _get_exchange(self) -> Exchange:
        if self._exchange is None:
            self._exchange = Exchange(self.process_group)
        return self._exchange

    def _device(self, ex: Exchange) -> torch.device:
        wanted = ex.device()
        if wanted is not None:
            return wanted
        if self.recorder.device is not None:
            return self.recorder.device
        for p in self._root.parameters():
            return p.device
        return torch.device("cpu")

    def _describe(self, what: str, detail: Any) -> str:
        if what == "slot":
            return repr(self.layout.slots[detail].name) if 0 <= detail < len(self.layout.slots) else "?"
        order, values = self._current_values(detail)
        return nonfinite_message(self.layout, order, detail, values)

    # ------------------------------------------------------------------ observability
    def metrics(self) -> dict[str, float]:
        """Figures of the last :meth:`loss` call, from its collective (no extra communication).

        Keys: ``"<slot>/<penalty label>"`` (penalty value; EMA value in ``ema`` mode, per-worker
        in ``local`` mode; 0 for a skipped step), ``"<slot>/count"``, ``"<slot>/mean_abs"``,
        ``"<slot>/rms"``, ``"<slot>/active_fraction"``, ``"<slot>/dead_units"`` (of the current
        step's global batch, or of the local shard in ``local`` mode), ``"total"``, and with
        ``nonfinite="skip"`` ``"skipped_steps"``. Reads the device (call it when you log).
        """
        self.check()
        if self._last is None:
            return {}
        wire, ok = self._last
        order, values = self._current_values(wire)
        keep = bool(ok)
        by_label = dict(zip(order, values.tolist(), strict=True)) if keep else {}
        out: dict[str, float] = {}
        for index, slot in enumerate(self.layout.slots):
            for label in slot.labels:
                out[f"{slot.name}/{label}"] = by_label.get((index, label), 0.0)
            if self.layout.dims[index] is not None:
                for key, v in activity_figures(self.layout, index, wire).items():
                    out[f"{slot.name}/{key}"] = v
        out["total"] = float(values.sum()) if keep else 0.0
        if self.nonfinite == "skip":
            out["skipped_steps"] = float(self._skipped) if self._skipped is not None else 0.0
        return out

    def _current_values(self, wire: Tensor) -> tuple[list[tuple[int, str]], Tensor]:
        """Penalty values of the last step (recomputed from its statistics, not kept by the step)."""
        evaluator = self._values(wire.dtype, wire.device)
        with torch.no_grad():
            if self.mode.moving_average and self.ema.flat is not None:
                values = evaluator.values(self.ema.flat, self.ema.scale())
            else:
                values = evaluator.values(wire, None)
        return evaluator.order(), values

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """State (identical on every rank): ``{"version", "sync", "decay", "step", "ema", "shift"}``.

        ``ema`` maps slot name -> penalty label -> statistic -> tensor of *global* sums, so it
        does not depend on the world size; ``shift`` maps slot name -> the shift around which its
        centred statistics are taken (see :mod:`actreg.centering`).
        """
        self.check()
        return {
            "version": 1,
            "sync": self.sync,
            "decay": self.decay,
            "step": self.ema.step_count(),
            "ema": self.ema.state() if self.mode.moving_average else {},
            "shift": self.shifts.state(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (saved at any world size)."""
        if state_dict.get("version") != 1:
            raise ValueError(f"unsupported actreg state version {state_dict.get('version')!r}")
        known = {s.name: set(s.labels) for s in self.layout.slots}
        for slot, per_label in state_dict["ema"].items():
            for label in per_label:
                if label not in known.get(slot, set()):
                    raise ValueError(
                        f"state has EMA statistics for {slot}/{label}, which this regularizer does "
                        f"not have (slots: {sorted(known)})"
                    )
        for slot in state_dict.get("shift", {}):
            if slot not in known:
                raise ValueError(f"state has a shift for {slot!r}, which this regularizer does not have")
        steps = int(state_dict["step"])
        self.ema.load(state_dict["ema"], steps)
        self.shifts.load(dict(state_dict.get("shift", {})))

    # ------------------------------------------------------------------ lifetime
    def remove(self) -> None:
        """Remove every hook; recorded but unused statistics are dropped."""
        self.recorder.remove()

    def __enter__(self) -> ActivityRegularizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        slots = ", ".join(f"{s.name}: {list(s.penalties)}" for s in self.layout.slots)
        return f"ActivityRegularizer(sync={self.sync!r}, slots={{{slots}}})"
