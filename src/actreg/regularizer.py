"""``ActivityRegularizer``: record statistics, one exchange per step, penalties, state."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .agreement import settle
from .ema import MovingAverage, check_state
from .exchange import Exchange, Exchanged, Packer
from .layout import Layout
from .metrics import nonfinite_message, step_metrics
from .modes import mode
from .penalty import Penalty
from .recording import Recorder
from .shifts import Shifts
from .slots import build_slots, named_modules, unwrap
from .values import Evaluator, build_groups
from .verdicts import Verdicts


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
        self.verdicts = Verdicts(nonfinite, self.slot_names)
        self._exchange: Exchange | None = None
        self._agreed = False
        self._evaluator: tuple[int, Evaluator] | None = None
        self.packer = Packer(self.layout)
        self._next_rows: dict[int, int] = {}
        self._steps = 0
        self._skipped: Tensor | None = None
        self._last: tuple[Tensor, Tensor] | None = None  # (reduced buffer, step went well)

    @property
    def slot_names(self) -> list[str]:
        """Names of the regularized slots (modules, then observed names), in buffer order."""
        return [s.name for s in self.layout.slots]

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

    def loss(self) -> Tensor:
        """Total penalty of the statistics recorded since the last call (one collective).

        In ``global``/``ema`` mode with more than one rank, this issues exactly one
        ``all_reduce`` for all penalties of all layers (plus, on the first call, a one-time check
        that all ranks built the same layout). Backward issues none. It first raises, on every
        rank, what the previous step decided (see :meth:`check`).
        """
        self.check()  # raise what the previous step decided, on every rank alike
        records = self.recorder.take()  # this step's records
        ex, communicate = settle(self, records)  # (first step) agree across ranks
        used = self.shifts.common(records.blocks, communicate)  # one centring shift per slot
        dtype, device = self._dtype_device(ex)
        g = ex.gradient_scale(self.grad_scale) if communicate else 1.0
        header, blocks = self.packer.pack(records, ex.rank, dtype, device)  # pack
        wire = Exchanged.apply(ex, communicate, g, self.packer.rows_plan(), header, *blocks)  # one collective

        with torch.no_grad():  # (under autograd, isfinite would save its input for backward)
            # one sum: NaN and inf propagate (inf - inf is NaN); also False when a rank failed to
            # record (NaN header). (isfinite().all() is ~40x slower on a CPU.)
            ok = torch.isfinite(wire.sum())
        stats, batch_scale = self.ema.blend(wire) if self.mode.moving_average else (wire, None)
        total = self._values(dtype, device).total(stats, batch_scale, ok)  # no NaN flows back
        with torch.no_grad():
            ok = ok & torch.isfinite(total)  # decisions: a failed step's penalty and gradient are 0
        total = torch.where(ok, total, 0.0)
        self._commit(wire.detach(), stats, used, ok, records.errors)
        return total

    def _commit(self, wire: Tensor, stats: Tensor, used: dict[int, Tensor], ok: Tensor, errs: list) -> None:
        """After the step: moving average, next shifts, the decision posted for the next call."""
        with torch.no_grad():
            if self.mode.moving_average:
                self.ema.commit(stats, ok)
            old = self.shifts.update(wire, used, ok)
            if self.mode.moving_average and old is not None:
                self.ema.recenter(self.shifts.delta(old), sorted(used))
            self._steps += 1
            self.verdicts.post(self._steps, wire, ok, errs)
            if self.nonfinite == "skip":
                self._skipped = ~ok if self._skipped is None else self._skipped + ~ok
        self._last = (wire, ok)
        if self._next_rows:
            self.layout.rows, self._next_rows = self._next_rows, {}

    def check(self) -> None:
        """Raise, on every rank, what the last :meth:`loss` decided on the device.

        A ``RecordingError`` if some rank could not record (its own message on that rank), a
        ``NonFiniteStatisticError`` if the global statistics or penalty were not finite and
        ``nonfinite="raise"``. Called by :meth:`loss`, :meth:`metrics` and :meth:`state_dict`;
        call it yourself after the last step of a run.
        """
        self.verdicts.check(self._get_exchange().who, self._explain_nonfinite)

    def _values(self, dtype: torch.dtype, device: torch.device) -> Evaluator:
        if self._evaluator is None or self._evaluator[0] != self.layout.version:
            self._evaluator = (self.layout.version, Evaluator(build_groups(self.layout), device, dtype))
        return self._evaluator[1]

    def _get_exchange(self) -> Exchange:
        if self._exchange is None:
            self._exchange = Exchange(self.process_group)
        return self._exchange

    def _dtype_device(self, ex: Exchange) -> tuple[torch.dtype, torch.device]:  # of the step buffer
        return self.recorder.dtype or torch.float32, ex.buffer_device(self.recorder.device, self._root)

    def _explain_nonfinite(self, wire: Tensor) -> str:
        return nonfinite_message(self.layout, *self._current_values(wire), wire=wire)

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
        skipped = None if self.nonfinite != "skip" else 0.0 if self._skipped is None else float(self._skipped)
        return step_metrics(self.layout, *self._current_values(wire), wire, bool(ok), skipped)

    def _current_values(self, wire: Tensor) -> tuple[list[tuple[int, str]], Tensor]:
        """Penalty values of the last step (recomputed from its statistics, not kept by the step)."""
        evaluator = self._values(wire.dtype, wire.device)
        with torch.no_grad():
            if self.mode.moving_average and self.ema.flat is not None:
                values = evaluator.values(self.ema.flat, self.ema.scale())
            else:
                values = evaluator.values(wire, None)
        return evaluator.order(), values

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
        check_state(self.layout, state_dict)
        steps = int(state_dict["step"])
        self.ema.load(state_dict["ema"], steps)
        self.shifts.load(dict(state_dict.get("shift", {})))

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
