"""Uneven inputs: ``ActivityRegularizer`` as a ``Joinable`` of ``torch.distributed.algorithms.Join``.

    with Join([ddp_model, reg]):
        for x, y in my_shard:          # ranks may have different numbers of batches
            loss = task(ddp_model(x), y) + reg.loss()
            loss.backward(); opt.step(); opt.zero_grad()

A rank that has run out of batches enters ``Join``'s loop; once per step of the ranks still
training it runs every joinable's *main hook*, which must shadow that joinable's collectives. Ours
runs the regularizer's step with nothing recorded: its statistics are zeros, so the reduced buffer
is the global statistics of the ranks still training -- each step's penalty is exactly the global
penalty of their batches -- and the joined rank commits the same moving average, shifts and step
count as they do (its state stays identical to theirs).

The order of the joinables: ``Join([ddp_model, reg])``. DDP, listed first, tells the joined ranks
at the start of each forward that a step follows. A training rank's statistics all-reduce then
comes between its forward and its backward, while a joined rank runs the main hooks one after
the other, DDP's (which waits for the backward's gradient all-reduces) first: it would wait for
a backward that cannot start before our shadow. So when the ``Join`` is built the regularizer
(i) moves its own hook before the others in that ``Join`` (:func:`arrange`) and (ii) moves its
exchange to a private process group with the same ranks (created once, by every member at the same
point: the ``Join(...)`` constructor), on which its collectives pair in order whatever DDP does on
its own group. ``Join([reg, ddp_model])`` is refused with a ``ValueError``: the first joinable
announces each step, and the regularizer would do it too late, after DDP's forward collectives.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from torch.distributed.algorithms.join import Join, JoinHook

if TYPE_CHECKING:
    from .regularizer import ActivityRegularizer


class ShadowStep(JoinHook):
    """Join hook: each main hook runs one regularizer step with nothing recorded on this rank."""

    def __init__(self, reg: ActivityRegularizer) -> None:
        self.reg = reg

    def main_hook(self) -> None:
        self.reg._shadow_step()

    def post_hook(self, is_last_joiner: bool) -> None:
        pass  # the shadow steps kept every rank's state identical: nothing to reconcile


_PRIVATE: dict[tuple[int, tuple[int, ...], str], Any] = {}


def private_group(group: Any) -> Any:
    """A process group with the ranks (and backend) of ``group`` (``None``: the default group).

    Must be called by every member of ``group`` at the same point of the program. Created once
    per set of ranks and process (a regularizer built per epoch reuses it): a group over the whole
    world is created by every rank, a subgroup by its members only (whose name is a hash of its
    ranks, so it must not be created twice).
    """
    world = dist.group.WORLD
    ranks = tuple(dist.get_process_group_ranks(group if group is not None else world))
    backend = str(dist.get_backend(group))
    key = (id(world), ranks, backend)
    if key not in _PRIVATE:
        whole = len(ranks) == dist.get_world_size()
        _PRIVATE[key] = dist.new_group(list(ranks), backend=backend, use_local_synchronization=not whole)
    return _PRIVATE[key]


def arrange(reg: ActivityRegularizer) -> None:
    """Called while ``Join(...)`` is being built: put the regularizer's hook before the others.

    Finds the ``Join`` under construction among the callers (``Join.__init__`` reads every
    joinable's ``join_process_group``) and moves our :class:`ShadowStep` to the front of its main
    hooks, so that a joined rank shadows the statistics collective before DDP's backward. Raises a
    ``ValueError`` (on every rank alike: the same list everywhere) for an order that cannot work.
    """
    config = reg._join_config
    if not config.enable:
        return
    join = _join_being_built(reg)
    if join is None:
        if config.is_first_joinable:
            return  # the only joinable we can see: nothing to arrange
        raise ValueError(
            "actreg could not find the Join being built to order its hooks; list the regularizer "
            "alone in its own Join or report your torch version"
        )
    joinables = list(join._joinables)
    position = next(i for i, j in enumerate(joinables) if j is reg)
    if position == 0 and len(joinables) > 1:
        raise ValueError(
            "Join([reg, ...]): list the model (and other joinables) before the ActivityRegularizer, "
            "e.g. Join([ddp_model, reg]); the first joinable announces every step at the start of "
            "its forward, and the regularizer's own collective comes after the forward"
        )
    hooks = join._join_hooks
    # every regularizer's hook first, in the order listed (several regularizers share the
    # private group of their ranks: call their loss() in that order)
    shadows = [h for h in hooks if isinstance(h, ShadowStep)]
    join._join_hooks = shadows + [h for h in hooks if not isinstance(h, ShadowStep)]


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
