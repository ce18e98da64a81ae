"""Uneven inputs: ``ActivityRegularizer`` as a ``Joinable`` of ``torch.distributed.algorithms.Join``.

    with Join([ddp_model, reg]):
        for x, y in my_shard:          # ranks may have different numbers of batches (0 too)
            loss = task(ddp_model(x), y) + reg.loss()
            loss.backward(); opt.step(); opt.zero_grad()

A rank that has run out of batches enters ``Join``'s loop; once per step of the ranks still
training it runs every joinable's *main hook*, which must shadow that joinable's collectives in
the order the training ranks issue them. Ours runs the regularizer's step with nothing recorded
(:meth:`ActivityRegularizer._shadow_step`): its statistics and weight sums are zeros, so the
reduced buffer holds the global statistics of the ranks still training -- each step's penalty is
exactly the global penalty of their batches -- and the joined rank commits the same moving
average, shifts and step count as they do (its state stays identical to theirs).

**Where the shadow goes.** A training rank issues, per step: DDP's forward-time collectives
(``notify_join_context``; ``_rebuild_buckets`` once, at its second iteration; the buffer broadcast
of ``broadcast_buffers=True``, every forward; ``_check_global_requires_backward_grad_sync``), then
the regularizer's ``loss()`` collective, then the backward's bucket all-reduces. DDP's join hook
shadows the forward-time part and then the backward (``_match_all_reduce_for_bwd_pass``) in one
``main_hook``. So the shadows must run *inside* DDP's hook, between the two: :class:`AroundDDP`
replaces DDP's hook in the ``Join`` and runs it with ``_match_all_reduce_for_bwd_pass`` intercepted
on that DDP instance, the shadows first. If DDP's hook returns without calling it (``no_sync``: no
backward synchronisation this step) the shadows run after it. A ``Join`` without a DDP hook (or a
torch whose DDP lacks the method) runs the shadows before the other hooks.

**Private groups.** Each regularizer of a ``Join`` exchanges over a private process group with the
ranks of its own (:func:`private_group`; created by every member while ``Join(...)`` is built, and
cached by ranks, backend and index among the regularizers of that ``Join``, so a regularizer
rebuilt per epoch reuses its group). Its collectives then pair with its shadow's whatever DDP does
on its own group, and several regularizers pair each with its own shadow whatever order the
training ranks call their ``loss()`` in: a joined rank runs the shadows of several regularizers
concurrently (:func:`run_shadows`, one thread each).

``Join([reg, ddp_model])`` is refused with a ``ValueError`` on every rank: the first joinable
announces each step at the start of its forward, and the regularizer's collective comes later.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.join import Join, JoinHook

if TYPE_CHECKING:
    from .regularizer import ActivityRegularizer

#: the DDP method whose collectives match the training ranks' backward (torch >= 1.10)
_BACKWARD_MATCH = "_match_all_reduce_for_bwd_pass"


class ShadowStep(JoinHook):
    """Join hook of one regularizer: each main hook runs one step with nothing recorded here.

    ``arrange`` takes these hooks out of the ``Join`` and runs them from :class:`AroundDDP` or
    :class:`Shadows`; this class is what ``ActivityRegularizer.join_hook`` returns.
    """

    def __init__(self, reg: ActivityRegularizer) -> None:
        self.reg = reg

    def main_hook(self) -> None:
        self.reg._shadow_step()

    def post_hook(self, is_last_joiner: bool) -> None:
        pass  # the shadow steps kept every rank's state identical: nothing to reconcile


def run_shadows(shadows: Sequence[ShadowStep]) -> None:
    """One shadow step of every regularizer in ``shadows``, concurrently when there are several.

    Each regularizer has its own private group, so the shadows pair with the training ranks'
    ``loss()`` calls in whatever order those come. Grad mode is thread-local (each shadow runs
    under ``no_grad`` itself); the current CUDA device is carried into the threads. The first
    error raised by a shadow is raised here as soon as it happens, without waiting for the
    others (their threads are daemons: a shadow whose training-rank call never comes cannot
    keep the process alive).
    """
    if len(shadows) == 1:
        shadows[0].main_hook()
        return
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    device = torch.cuda.current_device() if cuda else None
    done = threading.Condition()
    errors: list[BaseException] = []
    finished = [0]

    def one(hook: ShadowStep) -> None:
        try:
            if device is not None:
                torch.cuda.set_device(device)
            hook.main_hook()
        except BaseException as err:  # handed to the Join's thread
            with done:
                errors.append(err)
                done.notify()
            return
        with done:
            finished[0] += 1
            done.notify()

    threads = [threading.Thread(target=one, args=(h,), daemon=True, name="actreg-shadow") for h in shadows]
    for t in threads:
        t.start()
    with done:
        done.wait_for(lambda: errors or finished[0] == len(shadows))
        if errors:
            raise errors[0]


class Shadows(JoinHook):
    """The regularizers' shadows as one hook, run before the other joinables' hooks (no DDP)."""

    def __init__(self, shadows: Sequence[ShadowStep]) -> None:
        self.shadows = list(shadows)

    def main_hook(self) -> None:
        run_shadows(self.shadows)

    def post_hook(self, is_last_joiner: bool) -> None:
        pass


class AroundDDP(JoinHook):
    """DDP's join hook with the regularizers' shadows placed before its backward's all-reduces.

    ``main_hook`` runs DDP's own hook with ``ddp._match_all_reduce_for_bwd_pass`` replaced, on that
    instance and for the duration of the call, by: the shadows, then the original method. When
    DDP's hook returns without calling it (no backward synchronisation this step) the shadows run
    after it. ``post_hook`` is DDP's.
    """

    def __init__(self, inner: JoinHook, shadows: Sequence[ShadowStep]) -> None:
        self.inner = inner
        self.shadows = list(shadows)

    def main_hook(self) -> None:
        ddp = self.inner.ddp  # type: ignore[attr-defined]
        original = getattr(ddp, _BACKWARD_MATCH)  # bound method (or an instance attribute)
        had_own = _BACKWARD_MATCH in vars(ddp)
        shadowed = False

        def shadows_then_backward(*args: Any, **kwargs: Any) -> Any:
            nonlocal shadowed
            shadowed = True
            run_shadows(self.shadows)
            return original(*args, **kwargs)

        setattr(ddp, _BACKWARD_MATCH, shadows_then_backward)
        try:
            self.inner.main_hook()
        finally:
            if had_own:
                setattr(ddp, _BACKWARD_MATCH, original)
            else:
                delattr(ddp, _BACKWARD_MATCH)
        if not shadowed:
            run_shadows(self.shadows)

    def post_hook(self, is_last_joiner: bool) -> None:
        self.inner.post_hook(is_last_joiner)


_PRIVATE: dict[tuple[int, tuple[int, ...], str, int], Any] = {}


def private_group(group: Any, index: int = 0) -> Any:
    """A process group with the ranks (and backend) of ``group`` (``None``: the default group).

    ``index``: the regularizer's position among the regularizers of its ``Join`` -- each gets its
    own group. Must be called by every member of ``group`` at the same point of the program, for
    indices 0, 1, ... in order. Created once per (set of ranks, backend, index) and process (a
    regularizer built per epoch reuses it): a group over the whole world is created by every
    rank, a subgroup by its members only.
    """
    world = dist.group.WORLD
    ranks = tuple(dist.get_process_group_ranks(group if group is not None else world))
    backend = str(dist.get_backend(group))
    key = (id(world), ranks, backend, index)
    if key not in _PRIVATE:
        if index > 0:
            private_group(group, index - 1)  # lower indices first, in the same order everywhere
        whole = len(ranks) == dist.get_world_size()
        _PRIVATE[key] = dist.new_group(list(ranks), backend=backend, use_local_synchronization=not whole)
    return _PRIVATE[key]


def arrange(reg: ActivityRegularizer) -> None:
    """Called while ``Join(...)`` is being built (from ``join_process_group``): set the Join up.

    Finds the ``Join`` under construction among the callers (``Join.__init__`` reads every
    joinable's ``join_process_group``, after it made every join hook) and, once per ``Join``:
    gives each regularizer listed its private group (index = its position among them), takes
    their :class:`ShadowStep` hooks out and runs them from an :class:`AroundDDP` in place of the
    first DDP hook, or else from a :class:`Shadows` hook placed first. Raises a ``ValueError``
    (on every rank alike: the same list everywhere) for an order that cannot work.
    """
    config = reg._join_config
    if not config.enable:
        return
    join = _join_being_built(reg)
    if join is None:
        if config.is_first_joinable:
            reg._use_join_group(private_group(reg.process_group, 0))
            return  # the only joinable we can see: nothing to arrange
        raise ValueError(
            "actreg could not find the Join being built to order its hooks; list the regularizer "
            "alone in its own Join or report your torch version"
        )
    if getattr(join, "_actreg_arranged", False):
        return  # another regularizer of this Join arranged it
    joinables = list(join._joinables)
    if len(joinables) > 1 and joinables[0] is reg:
        raise ValueError(
            "Join([reg, ...]): list the model (and other joinables) before the ActivityRegularizer, "
            "e.g. Join([ddp_model, reg]); the first joinable announces every step at the start of "
            "its forward, and the regularizer's own collective comes after the forward"
        )
    hooks = list(join._join_hooks)
    shadows = [h for h in hooks if isinstance(h, ShadowStep)]
    for index, hook in enumerate(shadows):
        hook.reg._use_join_group(private_group(hook.reg.process_group, index))
    others = [h for h in hooks if not isinstance(h, ShadowStep)]
    ddp_at = next((i for i, h in enumerate(others) if _is_ddp_hook(h)), None)
    if ddp_at is not None:
        others[ddp_at] = AroundDDP(others[ddp_at], shadows)
        join._join_hooks = others
    else:
        join._join_hooks = [Shadows(shadows), *others]
    join._actreg_arranged = True  # type: ignore[attr-defined]


def _is_ddp_hook(hook: JoinHook) -> bool:
    """DDP's join hook (``_DDPJoinHook``), recognised by what ``AroundDDP`` needs of it."""
    return callable(getattr(getattr(hook, "ddp", None), _BACKWARD_MATCH, None))


def _join_being_built(reg: ActivityRegularizer) -> Join | None:
    frame = sys._getframe(1)
    for _ in range(6):
        frame = frame.f_back  # type: ignore[assignment]
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Join) and any(j is reg for j in getattr(candidate, "_joinables", ())):
            return candidate if hasattr(candidate, "_join_hooks") else None
    return None
