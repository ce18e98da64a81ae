"""``ActivityRegularizer``: record statistics, one exchange per step, penalties, state."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms.join import Join, Joinable, JoinHook

from . import fused as _fused
from .agreement import settle
from .ema import MovingAverage
from .exchange import Exchange, Exchanged, Packer
from .expert_bias import ExpertBiases, router_figures
from .joining import ShadowStep, arrange
from .layout import Layout
from .meshes import mesh_group
from .metrics import nonfinite_message, step_metrics
from .modes import mode
from .penalty import Penalty
from .recording import Recorder, Records, check_sequence
from .shifts import Shifts
from .slots import build_slots, named_modules, unwrap
from .state import check_state_dict
from .values import Evaluator, build_groups
from .verdicts import Verdicts
from .weights import WeightPenalty, WeightTerms
from .window import FORGOTTEN_AFTER, CountWindow


class ActivityRegularizer(Joinable):
    """Activity penalties on a model's layers with global-batch semantics under data parallelism.

    Args:
        model: an ``nn.Module``, plain or wrapped in DDP (module names are those of the unwrapped
            model; FSDP / checkpoint / ``torch.compile`` wrapper prefixes are removed).
        penalties: ``{glob: penalty or [penalties]}`` (may be empty when ``weights`` is given);
            each glob is matched with ``fnmatch`` against ``named_modules()`` names. Every matched
            module is its own *slot*: its output (first element of a tuple output) is recorded on
            every call during a forward with autograd enabled (in training mode), and its penalties
            are summed into :meth:`loss`. A glob matching no module is a ``ValueError`` unless it
            is listed in ``observed``.
        sync: ``"local"`` -- per-worker statistics, no communication; ``"global"`` -- statistics of
            the global batch, exact gradients; ``"ema"`` -- moving average of global statistics,
            ``E_t = decay * E_{t-1} + (1 - decay) * S_t``.
        decay: EMA decay, used by ``sync="ema"``.
        process_group: the data-parallel group (default: the default group; none initialised
            means a single process).
        mesh: instead of ``process_group``, a ``DeviceMesh`` with named dimensions; the group
            and ``grad_scale`` are derived from ``split_dims`` and ``average_dims`` (see
            :mod:`actreg.meshes`).
        split_dims: with ``mesh``: the dimensions whose ranks hold different samples or tokens of
            the global batch -- data, context, and tensor parallel when the recorded input is
            sequence-parallel (split over its ranks); not tensor parallel with a replicated
            activation. The group is this rank's ranks along them (a 1-D mesh: its dimension).
        average_dims: with ``mesh``: the dimensions over which the gradient reduction *averages*
            (DDP/FSDP); default ``split_dims``. A split dimension not listed is one whose
            gradients are *summed* (Megatron's tensor-parallel reduction of a replicated
            parameter under sequence parallelism). ``grad_scale`` is the product of the sizes of
            the averaged split dimensions.
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
        weights: ``{glob: WeightL2(λ) | WeightL1(λ) | [both]}``: penalties on parameters,
            ``λ·Σ p²`` / ``λ·Σ |p|`` over every matched parameter, whole -- also when it is sharded
            (FSDP2 ``fully_shard``). Globs are matched against ``named_parameters()`` names (wrapper
            prefixes removed); the sums ride in the step's one collective (see
            :mod:`actreg.weights`). Their values appear in :meth:`metrics` as
            ``"weights/WeightL2"`` (``"weights/WeightL2_2"``, ... when repeated).
        fused: compute each recorded activation's statistics with generated kernels (one pass in
            forward, one in backward; see :mod:`actreg.fused`), compiled on first use of each
            layout (seconds). ``None`` (default): only if the environment variable
            ``ACTREG_FUSED`` is ``1`` (opt-in); ``True``: on; ``False``: the eager statistics.
            Either way the same values, to rounding; the eager code also runs wherever a kernel
            cannot be compiled. With fused kernels a regularized module returns its output as a
            view passed through the statistics' node (in-place operations on it raise in forward,
            as they did in backward before).
        record_eval: also record modules in ``eval()`` mode. By default a module records only
            while ``module.training`` (and :meth:`observe` only while the model is training), so
            an evaluation pass under autograd adds nothing to the next step's penalty.

    Every setting is compared across ranks on the first :meth:`loss` (in every mode): ranks that
    differ raise the same ``LayoutMismatchError`` together instead of meeting in mismatched
    collectives. Uneven numbers of steps per rank: use ``torch.distributed.algorithms.Join``
    with the regularizer among the joinables (see :mod:`actreg.joining`).

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
        mesh: Any = None,
        split_dims: str | Sequence[str] | None = None,
        average_dims: str | Sequence[str] | None = None,
        observed: Iterable[str] = (),
        grad_scale: float | None = None,
        stats_dtype: torch.dtype | None = None,
        nonfinite: str = "raise",
        activity_threshold: float = 0.0,
        record_eval: bool = False,
        weights: Mapping[str, WeightPenalty | Sequence[WeightPenalty]] | None = None,
        fused: bool | None = None,
    ) -> None:
        super().__init__()  # Joinable
        self.mode = mode(sync)
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be a number in [0, 1), got {decay!r}")
        if isinstance(activity_threshold, bool) or not isinstance(activity_threshold, (int, float)) or not (
            0.0 <= activity_threshold < float("inf")
        ):
            raise ValueError(f"activity_threshold must be a finite number >= 0, got {activity_threshold!r}")
        if grad_scale is not None and (
            isinstance(grad_scale, bool)
            or not isinstance(grad_scale, (int, float))
            or not 0 < grad_scale < float("inf")
        ):
            raise ValueError(f"grad_scale must be a finite number > 0 (or None), got {grad_scale!r}")
        if mesh is None and (split_dims is not None or average_dims is not None):
            raise ValueError("split_dims= and average_dims= name dimensions of a DeviceMesh: give mesh= too")
        if mesh is not None:
            if process_group is not None:
                raise ValueError(
                    "give process_group= or mesh= (with split_dims=), not both: the group is derived "
                    "from the mesh"
                )
            if grad_scale is not None and average_dims is not None:
                raise ValueError(
                    "give grad_scale= or average_dims=, not both: grad_scale is derived from them"
                )
            process_group, derived = mesh_group(mesh, split_dims, average_dims)
            grad_scale = derived if grad_scale is None else grad_scale
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if stats_dtype is not None and not stats_dtype.is_floating_point:
            raise ValueError(f"stats_dtype must be a floating dtype, got {stats_dtype}")
        if fused is not None and not isinstance(fused, bool):
            raise ValueError(f"fused must be True, False or None (ACTREG_FUSED decides), got {fused!r}")
        self.sync = sync
        self.decay = float(decay)
        self.process_group = process_group
        self.grad_scale = grad_scale
        self.stats_dtype = stats_dtype
        self.nonfinite = nonfinite
        self.activity_threshold = float(activity_threshold)
        self.record_eval = bool(record_eval)

        self._root = unwrap(model)
        self.weights = WeightTerms(self._root, weights) if weights else None
        slots = build_slots(self._root, penalties, list(observed), allow_empty=self.weights is not None)
        self.layout = Layout(slots, self.activity_threshold)
        self._names = {s.name: i for i, s in enumerate(self.layout.slots)}
        self.shifts = Shifts(self.layout)
        self.recorder = Recorder(self.layout, named_modules(self._root), self.shifts)
        self.recorder.dtype = stats_dtype
        self.recorder.record_eval = self.record_eval
        self.fused = _fused.default_enabled() if fused is None else fused
        self.recorder.fused = self.fused
        self.biases = ExpertBiases(self.layout, _device_of(self._root))  # ExpertBias routers
        self.recorder.biases = {i: self.biases.bias(i) for i in self.biases.routers}
        self.window = CountWindow(self.layout)  # LoadBalance(counts="window"): reduced counts so far
        if self.window and self.mode.moving_average:
            raise ValueError(
                "LoadBalance(counts='window') with sync='ema': the window sums the counts of the "
                "micro-batches of one optimizer step, the moving average smooths statistics over steps; "
                "one or the other, not both -- use counts='window' with sync='global' (or 'local'), or "
                "the default counts='batch' with sync='ema'"
            )
        self._since_update = 0  #: loss() calls since update_bias() closed the windows (host side)
        self._warned_update = False
        self.ema = MovingAverage(self.layout, self.decay)
        self.verdicts = Verdicts(nonfinite, self.slot_names)
        self._exchange: Exchange | None = None
        self._agreed = False
        #: the statistics dtype agreed so far; the recorder's stays None until an activation was
        #: recorded on some rank (a first step that saw none cannot know the activations' dtype)
        self._dtype_floor = stats_dtype or torch.float32
        self._evaluator: tuple[int, Evaluator] | None = None
        self.packer = Packer(self.layout)
        self._next_rows: dict[int, int] = {}
        self._steps = 0
        self._skipped: Tensor | None = None
        self._last: tuple[Tensor, Tensor] | None = None  # (reduced buffer, step went well)
        self._last_weights: Tensor | None = None  # reduced weight sums of the last step
        self._join_group: Any = None  # private process group, once a Join was built (see joining)
        self._join_arranged: Any = None  # the join config that `arrange` has seen

    @property
    def slot_names(self) -> list[str]:
        """Names of the regularized slots (modules, then observed names), in buffer order."""
        return [s.name for s in self.layout.slots]

    def observe(
        self, name: str, tensor: Tensor, mask: Tensor | None = None, *, sequence: Tensor | None = None
    ) -> None:
        """Record ``tensor`` (``[..., d]``) for the penalties registered under ``name``.

        ``mask`` (bool, broadcastable over the positions ``tensor.shape[:-1]``) drops positions
        where it is False from every statistic. ``sequence`` (an integer tensor broadcastable over
        the positions): each position's *global* sequence index, for ``SequenceBalance``; the other
        penalties of the slot ignore it. Several calls in one step accumulate.
        """
        if name not in self._names:
            raise ValueError(
                f"reg.observe({name!r}): no penalties are registered under that name; "
                f"known names: {self.slot_names}"
            )
        if sequence is not None:
            check_sequence(name, sequence, self.recorder.layout.slots[self._names[name]].penalties)
        if torch.is_grad_enabled() and (self._root.training or self.record_eval):
            self.recorder.record(self._names[name], tensor, mask, sequence)

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
        Join.notify_join_context(self)  # (inside a Join: this rank still trains)
        return self._step(self.recorder.take())  # this step's records

    def _shadow_step(self) -> None:
        """A joined rank's step (see :mod:`actreg.joining`): zeros for its statistics and weight
        sums (its parameters are stale: DDP stops updating them when it joins), same state.

        It first raises what the previous step decided, as ``loss()`` does on the training ranks
        (the same posted decision: every rank committed the same step), so a joined rank raises
        the same error with them instead of waiting for a collective that will not come."""
        self.check()
        self.recorder.take()  # nothing should be pending; drop it if something is
        with torch.no_grad():
            self._step(Records(), shadow=True)

    def _step(self, records: Records, shadow: bool = False) -> Tensor:
        ex, communicate = settle(self, records)  # (first step) agree across ranks
        used = self.shifts.common(records.blocks)  # one centring shift per slot (pending ones: none)
        dtype, device = self._dtype_device(ex)
        g = ex.gradient_scale(self.grad_scale) if communicate else 1.0
        header, blocks = self.packer.pack(records, ex.rank, dtype, device)  # pack
        plan = self.packer.rows_plan()
        # under Join (a private group was set up) the weight sums are followed by the number of
        # ranks that contributed them: a joined rank contributes zeros (see _weights_block)
        counted = self.weights is not None and communicate and self._join_group is not None
        if self.weights is not None:  # the weight sums ride at the end of the same buffer
            world = ex.world_size if communicate else 1
            blocks.extend(self._weights_block(dtype, device, world, g, shadow, counted))
            plan = None if plan is None else [*plan, *[None] * (1 + counted)]
        wire = Exchanged.apply(ex, communicate, g, plan, header, *blocks)  # one collective

        with torch.no_grad():  # (under autograd, isfinite would save its input for backward)
            # one sum: NaN and inf propagate (inf - inf is NaN); also False when a rank failed to
            # record (NaN header). (isfinite().all() is ~40x slower on a CPU.)
            ok = torch.isfinite(wire.sum())
        weight_sums = None
        if self.weights is not None:
            weight_sums = wire.narrow(0, self.layout.size, len(self.weights))
            if counted:  # W / (ranks still training): the sums of one replica (see _weights_block)
                contributing = wire.narrow(0, self.layout.size + len(self.weights), 1).detach()
                weight_sums = weight_sums * (ex.world_size / contributing.clamp_min(1.0))
            wire = wire.narrow(0, 0, self.layout.size)
        stats, batch_scale = self.ema.blend(wire) if self.mode.moving_average else (wire, None)
        window = self.window.current(wire, ok) if self.window else None  # (counts="window")
        evaluator = self._values(dtype, device)
        compiled = None
        if self.fused and weight_sums is None:  # one compiled region: values, decision, where
            compiled = evaluator.compiled_total(stats, batch_scale, ok, window)
        if compiled is not None:
            total, ok = compiled
        else:
            total = evaluator.total(stats, batch_scale, ok, window)  # no NaN flows back
            if weight_sums is not None:
                total = total + weight_sums @ self.weights.coefficients(dtype, device)  # type: ignore[union-attr]
                self._last_weights = weight_sums.detach()
            with torch.no_grad():
                ok = ok & torch.isfinite(total)  # decisions: a failed step's penalty and gradient are 0
            total = torch.where(ok, total, 0.0)
        self._commit(wire.detach(), stats, used, ok, records.errors)
        return total

    def _weights_block(
        self, dtype: torch.dtype, device: torch.device, world: int, g: float, shadow: bool, counted: bool
    ) -> list[Tensor]:
        """This rank's weight sums for the wire (``Σ f(p) / W`` per penalty, see :mod:`actreg.weights`),
        and with ``counted`` a last value: 1 on a training rank, 0 on a joined one.

        A joined rank's parameters are stale (DDP no longer updates them), so its shadow step
        contributes zeros: the reduced sums are ``(C/W) Σ f(p)`` for the ``C`` ranks still
        training, and the step rescales them by ``W/C`` -- the value is ``λ Σ f(p)`` of the
        training replicas, and (through the rescale) each training rank's gradient is
        ``(g/C) λ f'(p)``, which DDP's averaging over the initial ``W`` ranks (``Join``'s default
        ``divide_by_initial_world_size=True``) turns into ``λ f'(p)``: the value and gradient of
        one process, as without ``Join``.
        """
        assert self.weights is not None
        if shadow:
            sums = torch.zeros(len(self.weights), dtype=dtype, device=device)
        else:
            sums = self.weights.block(dtype, device, world, g)
        if not counted:
            return [sums]
        return [sums, torch.full((1,), 0.0 if shadow else 1.0, dtype=dtype, device=device)]

    def _commit(
        self, wire: Tensor, stats: Tensor, used: dict[int, Tensor], ok: Tensor, errs: list[str]
    ) -> None:
        """After the step: moving average, next shifts, the decision posted for the next call."""
        with torch.no_grad():
            if self.mode.moving_average:
                self.ema.commit(stats, ok)
            old = self.shifts.update(wire, used, ok)
            if self.biases:  # the reduced top-k counts join the window of the expert biases
                self.biases.add(wire, ok)
            self.window.commit()  # (LoadBalance(counts="window"): the step joins the window)
            if self.biases or self.window:
                self._count_window_step()
            if self.mode.moving_average and old is not None:
                self.ema.recenter(self.shifts.delta(old), sorted(used))
            self._steps += 1
            self.verdicts.post(self._steps, wire, ok, errs)
            if self.nonfinite == "skip":  # a count (int64): bool + bool would stay a bool
                skipped = ~ok
                self._skipped = skipped.long() if self._skipped is None else self._skipped + skipped
        self._last = (wire, ok)
        if self._next_rows:
            self.layout.rows, self._next_rows = self._next_rows, {}

    def _count_window_step(self) -> None:
        """One more ``loss()`` in the windows that :meth:`update_bias` closes; warn once when it
        looks forgotten (``FORGOTTEN_AFTER`` calls without it)."""
        self._since_update += 1
        if self._since_update != FORGOTTEN_AFTER or self._warned_update:
            return
        self._warned_update = True
        forgotten = []
        if self.biases:
            forgotten.append("an expert bias update (the biases of ExpertBias do not move)")
        if self.window:
            forgotten.append("closing the window of LoadBalance(counts='window') (its counts keep growing)")
        warnings.warn(
            f"actreg: {FORGOTTEN_AFTER} reg.loss() calls without {' or '.join(forgotten)}; call "
            "reg.update_bias() once per optimizer step (after optimizer.step()) or "
            "reg.attach(optimizer) once",
            RuntimeWarning,
            stacklevel=5,
        )

    # ------------------------------------------------------------------ expert bias (ExpertBias)
    def expert_bias(self, name: str) -> Tensor:
        """The expert bias ``b`` ``[E]`` of router ``name`` (a slot with an :class:`ExpertBias`).

        Add it to the router scores for the top-k choice only (not to the gating weights)::

            idx = torch.topk(scores + reg.expert_bias("layers.3.router"), k).indices

        with ``scores = softmax(logits)`` or ``sigmoid(logits)`` as the ``ExpertBias``'s ``score``
        (:meth:`route` does exactly this). The tensor is live (float32, no gradient, identical on
        every rank): :meth:`update_bias` moves it in place, so holding it across steps is fine.
        """
        index = self._names.get(name)
        if index is None or index not in self.biases.routers:
            routers = [self.slot_names[i] for i in self.biases.routers]
            raise ValueError(
                f"reg.expert_bias({name!r}): no ExpertBias is registered under that name; routers with "
                f"one: {routers} (register actreg.ExpertBias(num_experts, top_k) on the router's slot)"
            )
        return self.biases.bias(index)

    def route(self, name: str, logits: Tensor) -> Tensor:
        """Indices ``[..., k]`` of each token's top-k experts under router ``name``'s expert bias:
        ``topk(scores(logits) + b, k)``, the very choice its penalties record (no gradient).

        Gate with the unbiased scores: ``w = scores.gather(-1, idx)`` (DeepSeek-V3 normalises them).
        """
        bias = self.expert_bias(name)
        penalty = self.biases.routers[self._names[name]][1]
        acc = torch.promote_types(logits.dtype, torch.float32)  # as recorded: no float32 copy lost
        return penalty._chosen(logits.to(acc), bias)

    def update_bias(self) -> None:
        """Move every expert bias once, from the counts of the window: all ``loss()`` calls since
        the last update (every micro-batch, every rank). Call it once per optimizer step, after
        ``optimizer.step()`` -- or call :meth:`attach` once instead. No communication, no host read.

        It closes the window of every windowed statistic: the expert biases' counts and those of
        ``LoadBalance(counts="window")`` start afresh.

        ``b_e += rate * sign(L/E - load_e)`` (``update="sign"``), minus its mean over the experts
        with ``update="centred"``; see :class:`actreg.ExpertBias`. Records not yet taken by a
        ``loss()`` stay for the next window (a warning: ``loss()`` belongs before the step).
        """
        if self.biases.attached is not None:
            raise RuntimeError(
                "reg.update_bias(): this regularizer is attached to an optimizer (reg.attach), whose "
                "step already updates the expert biases; calling it too would update them twice"
            )
        self._update_bias()

    def _update_bias(self) -> None:
        if not self.biases and not self.window:
            raise ValueError(
                "no ExpertBias is registered, and no LoadBalance(counts='window'): there is no expert "
                "bias to update and no window to close (register actreg.ExpertBias(num_experts, top_k) "
                "on a router's slot, or give LoadBalance counts='window')"
            )
        if self.recorder._records.blocks:
            warnings.warn(
                "actreg: the expert biases were updated while records of a forward wait for reg.loss(); "
                "their counts go to the next window. Call reg.loss() before optimizer.step().",
                RuntimeWarning,
                stacklevel=3,
            )
        if self.biases:
            self.biases.update()
        self.window.close()
        self._since_update = 0

    def attach(self, optimizer: torch.optim.Optimizer) -> Any:
        """Update the expert biases after every ``optimizer.step()`` (a step post-hook): the
        once-per-optimizer-step trigger of :meth:`update_bias`, not to be mixed with calling it
        (it also closes the window of ``LoadBalance(counts="window")``).
        Returns the hook's handle (``handle.remove()`` detaches). Attach once per regularizer."""
        if self.biases.attached is not None:
            raise ValueError("reg.attach(optimizer): already attached; the biases must move once per step")
        if not self.biases and not self.window:
            raise ValueError(
                "reg.attach(optimizer): no ExpertBias is registered, and no LoadBalance(counts='window'), "
                "so there is nothing to update "
                "(register actreg.ExpertBias(num_experts, top_k) on a router's slot)"
            )
        biases = self.biases

        def hook(opt: Any, args: Any, kwargs: Any) -> None:
            self._update_bias()

        inner = optimizer.register_step_post_hook(hook)

        class _Handle:
            def remove(self) -> None:
                inner.remove()
                biases.attached = None

        biases.attached = _Handle()
        return biases.attached

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
            self._exchange = Exchange(self._join_group or self.process_group)
        return self._exchange

    # ------------------------------------------------------------------ Joinable
    def join_hook(self, **kwargs: Any) -> JoinHook:
        """The hook ``Join`` runs on a rank that has run out of inputs (see :mod:`actreg.joining`).

        Called by every rank when the ``Join`` is built. While it is built (``join_process_group``)
        :func:`actreg.joining.arrange` gives the regularizer a private group with the same ranks
        (its own among the regularizers of that ``Join``), over which it exchanges from then on:
        its collectives pair with the shadows of a joined rank whatever DDP does on its group.

        ``Join(..., divide_by_initial_world_size=False)`` is refused (a ``ValueError`` on every rank,
        which all build the ``Join`` alike): DDP would then divide gradients by the number of ranks
        still training, which the surrogate's factor ``grad_scale`` cannot know without reading
        the device, so the penalty's gradient would be too large by ``W / C``.
        """
        if not kwargs.get("divide_by_initial_world_size", True):
            raise ValueError(
                "Join(..., divide_by_initial_world_size=False) is not supported with an "
                "ActivityRegularizer: DDP would divide gradients by the number of ranks still "
                "training, and the penalty's gradient would be too large by world_size / that number. "
                "Use the default (True): the penalty's gradient is then exactly that of the global "
                "penalty of the batches present"
            )
        return ShadowStep(self)

    def _use_join_group(self, group: Any) -> None:
        """Exchange over ``group`` from the next step on (called by every rank at the same point)."""
        if group is not self._join_group:
            self._join_group = group
            self._exchange = None

    @property
    def join_device(self) -> torch.device:
        return self._dtype_device(self._get_exchange())[1]

    @property
    def join_process_group(self) -> Any:
        # read while Join(...) is built (and, for the first joinable, every step): arrange the
        # hooks once per Join -- each Join gives its joinables a new config
        if self._join_arranged is not self._join_config:
            self._join_arranged = self._join_config
            arrange(self)
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def _dtype_device(self, ex: Exchange) -> tuple[torch.dtype, torch.device]:  # of the step buffer
        return self.recorder.dtype or self._dtype_floor, ex.buffer_device(self.recorder.device, self._root)

    def _explain_nonfinite(self, wire: Tensor) -> str:
        return nonfinite_message(self.layout, *self._current_values(wire), wire=wire)

    def metrics(self) -> dict[str, float]:
        """Figures of the last :meth:`loss` call, from its collective (no extra communication).

        Keys: ``"<slot>/<penalty label>"`` (penalty value; EMA value in ``ema`` mode, per-worker
        in ``local`` mode; 0 for a skipped step), ``"<slot>/count"``, ``"<slot>/mean_abs"``,
        ``"<slot>/rms"``, ``"<slot>/active_fraction"``, ``"<slot>/dead_units"`` (of the current
        step's global batch, or of the local shard in ``local`` mode), ``"total"``, and with
        ``nonfinite="skip"`` ``"skipped_steps"``. Routers with an :class:`ExpertBias` add
        ``"<slot>/max_violation"`` (MaxVio = ``max_e load_e / mean_e load_e - 1``) and
        ``"<slot>/dead_experts"`` (experts no token chose), from the reduced top-k counts of the
        last ``loss()`` (its global batch). Reads the device (call it when you log).
        """
        self.check()
        if self._last is None:
            return {}
        wire, ok = self._last
        skipped = None if self.nonfinite != "skip" else 0.0 if self._skipped is None else float(self._skipped)
        out = step_metrics(self.layout, *self._current_values(wire), wire, bool(ok), skipped)
        for index, counts in self.biases.counts(wire).items():  # ExpertBias routers: MaxVio, dead
            for key, v in router_figures(counts).items():
                out[f"{self.slot_names[index]}/{key}"] = v
        if self.weights is not None and self._last_weights is not None:
            values = self._last_weights * self.weights.coefficients(wire.dtype, wire.device)
            figures = values.tolist() if bool(ok) else [0.0] * len(self.weights)
            for label, v in zip(self.weights.labels, figures, strict=True):
                out[f"weights/{label}"] = v
            out["total"] += sum(figures)
        return out

    def _current_values(self, wire: Tensor) -> tuple[list[tuple[int, str]], Tensor]:
        """Penalty values of the last step (recomputed from its statistics, not kept by the step)."""
        evaluator = self._values(wire.dtype, wire.device)
        with torch.no_grad():
            if self.mode.moving_average and self.ema.flat is not None:
                values = evaluator.values(self.ema.flat, self.ema.scale(), self.window.last)
            else:
                values = evaluator.values(wire, None, self.window.last)
        return evaluator.order(), values

    def state_dict(self) -> dict[str, Any]:
        """State (identical on every rank): ``{"version", "sync", "decay", "step", "ema", "shift", "dims"}``.

        ``ema`` maps slot name -> penalty label -> statistic -> tensor of *global* sums, so it
        does not depend on the world size; ``shift`` maps slot name -> the shift around which its
        centred statistics are taken (see :mod:`actreg.centering`); ``dims`` maps slot name -> the
        feature size of each slot that has run; with :class:`ExpertBias` routers, ``"expert_bias"``
        maps each one's slot name -> its bias ``[E]`` (the window of counts is not kept: save after
        the optimizer step's bias update).
        """
        self.check()
        state = {
            "version": 1,
            "sync": self.sync,
            "decay": self.decay,
            "step": self.ema.step_count(),
            "ema": self.ema.state() if self.mode.moving_average else {},
            "shift": self.shifts.state(),
            "dims": {
                s.name: size
                for i, (s, d) in enumerate(zip(self.layout.slots, self.layout.dims, strict=True))
                if (size := d or self.recorder.loaded_dims.get(i)) is not None
            },
        }
        if self.biases:  # {router slot: its expert bias [E]}
            state["expert_bias"] = self.biases.state()
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (saved at any world size).

        Everything is validated before anything is applied (see :mod:`actreg.state`): a state of
        another ``sync`` or ``decay``, of other slots, penalties or feature sizes, with missing or
        damaged statistics is a ``ValueError`` naming the key, and leaves the regularizer as it was.
        """
        loaded = check_state_dict(
            self.layout,
            state_dict,
            sync=self.sync,
            decay=self.decay,
            moving_average=self.mode.moving_average,
        )
        biases = self.biases.check(state_dict.get("expert_bias"))
        self.ema.load(loaded.ema, loaded.step)
        self.biases.load(biases)
        self.window.close()
        self._since_update = 0
        self.shifts.load(loaded.shift)
        self.recorder.loaded_dims = dict(loaded.dims)

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


def _device_of(model: nn.Module) -> torch.device:
    """Where the model's first parameter (or buffer) lives; the CPU for a model with neither."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")
