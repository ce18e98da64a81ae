"""Aux-loss-free balancing: the expert bias of every ``ExpertBias`` router, kept by the regularizer.

All routers' biases live in one flat float32 tensor ``b`` (one view of ``[E_r]`` per router slot,
updated in place, so a view handed out by ``reg.expert_bias(name)`` stays live). Each ``loss()``
adds the reduced top-k counts of every bias router -- read from the step's buffer, which the step's
one collective already summed over the ranks -- into a window ``w`` on the device (a step whose
statistics were not finite adds nothing). ``update()`` (once per optimizer step) applies, per router
``r`` with ``E`` experts and ``L = sum_e w_e``::

    d_e = rate_r * sign(L - E w_e)          # = rate_r * sign(L/E - w_e), exact on integer counts
    d_e -= mean_{j in r} d_j                # update="centred" only (torchtitan)
    b_e += d_e;  w_e = 0

with a fixed number of ops whatever the number of routers, and nothing read on the host. The
reduced counts are identical on every rank, so is ``b``. In ``local`` mode the counts, and so the
biases, are each rank's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .layout import Layout
from .penalties import ExpertBias, _Router


class ExpertBiases:
    """The biases, the window of counts and where each router's counts sit in the step buffer."""

    def __init__(self, layout: Layout, device: torch.device) -> None:
        self.layout = layout
        #: slot index -> (label, penalty) of its ExpertBias
        self.routers: dict[int, tuple[str, ExpertBias]] = {}
        for index, slot in enumerate(layout.slots):
            pairs = zip(slot.labels, slot.penalties, strict=True)
            found = [(lab, p) for lab, p in pairs if isinstance(p, ExpertBias)]
            if not found:
                continue
            if len(found) > 1:
                raise ValueError(
                    f"{slot.name!r} has {len(found)} ExpertBias penalties; a router has one expert bias: "
                    "register one ExpertBias per router slot"
                )
            bias = found[0][1]
            for p in slot.penalties:
                if isinstance(p, _Router) and (p.num_experts, p.top_k, p.score) != (
                    bias.num_experts,
                    bias.top_k,
                    bias.score,
                ):
                    raise ValueError(
                        f"{p!r} and {bias!r} on {slot.name!r} route differently; every router penalty of a "
                        "slot with an ExpertBias records the biased choice, so give them the same "
                        "num_experts, top_k and score"
                    )
            self.routers[index] = found[0]
        sizes = [p.num_experts for _, p in self.routers.values()]
        self.starts: dict[int, int] = {}
        at = 0
        for index, e in zip(self.routers, sizes, strict=True):
            self.starts[index] = at
            at += e
        self.flat = torch.zeros(at, dtype=torch.float32, device=device)  #: the biases
        self.window: Tensor | None = None  #: counts since the last update (wire dtype)
        router_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long))
        self._router_of = router_of.to(device)
        self._experts = torch.tensor(sizes, dtype=torch.float64, device=device)
        rates = [p.rate for _, p in self.routers.values()]
        self._rates = torch.tensor(rates, dtype=torch.float64, device=device)[self._router_of]
        centred = [p.update == "centred" for _, p in self.routers.values()]
        self._centred = torch.tensor(centred, dtype=torch.bool, device=device)[self._router_of]
        self._any_centred = any(centred)
        self._reads: tuple[int, Tensor, Tensor] | None = None  #: (layout version, src, dst)
        self.attached: Any = None  #: the optimizer hook's handle, once ``reg.attach(optimizer)``

    def __bool__(self) -> bool:
        return bool(self.routers)

    def bias(self, index: int) -> Tensor:
        """The live ``[E]`` view of slot ``index``'s bias."""
        e = self.routers[index][1].num_experts
        return self.flat.narrow(0, self.starts[index], e)

    def _places(self, wire: Tensor) -> tuple[Tensor, Tensor]:
        """Buffer positions of the counts of the routers of known size, and their places in ``b``."""
        if self._reads is None or self._reads[0] != self.layout.version:
            src: list[int] = []
            dst: list[int] = []
            for index, (label, p) in self.routers.items():
                if self.layout.dims[index] is None:
                    continue  # not run on any rank yet: no counts
                at = self.layout.where(index, label)["assigned"].offset
                src.extend(range(at, at + p.num_experts))
                dst.extend(range(self.starts[index], self.starts[index] + p.num_experts))
            long = {"dtype": torch.long, "device": wire.device}
            self._reads = (self.layout.version, torch.tensor(src, **long), torch.tensor(dst, **long))  # type: ignore[arg-type]
        return self._reads[1], self._reads[2]

    def counts(self, wire: Tensor) -> dict[int, Tensor]:
        """Each router's reduced counts in the step buffer ``wire`` (routers of known size)."""
        return {
            index: wire.narrow(0, self.layout.where(index, label)["assigned"].offset, p.num_experts)
            for index, (label, p) in self.routers.items()
            if self.layout.dims[index] is not None
        }

    def add(self, wire: Tensor, ok: Tensor) -> None:
        """Add a step's reduced counts to the window (none where ``ok`` is False). 3 ops."""
        if self.window is None:
            self.window = wire.new_zeros(self.flat.numel())
        src, dst = self._places(wire)
        self.window.index_add_(0, dst, torch.where(ok, wire.index_select(0, src), 0.0))

    def update(self) -> None:
        """Apply the sign update to every bias from the window's counts; start a new window."""
        if self.window is None:
            return  # no loss() since the last update: nothing counted, nothing moves
        with torch.no_grad():
            load = self.window.to(torch.float64)
            if self._router_of.device != load.device:  # (the buffer's device: once)
                for key in ("_router_of", "_experts", "_rates", "_centred"):
                    setattr(self, key, getattr(self, key).to(load.device))
            ids, experts = self._router_of, self._experts
            total = load.new_zeros(experts.numel()).index_add_(0, ids, load)[ids]
            delta = self._rates * torch.sign(total - experts[ids] * load)
            if self._any_centred:
                mean = (delta.new_zeros(experts.numel()).index_add_(0, ids, delta) / experts)[ids]
                delta = delta - torch.where(self._centred, mean, 0.0)
            self.flat.add_(delta.to(self.flat))
            self.window.zero_()

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Tensor]:
        """``{slot name: bias [E]}`` (what ``state_dict()["expert_bias"]`` holds)."""
        return {self.layout.slots[i].name: self.bias(i).detach().clone() for i in self.routers}

    def check(self, value: Any) -> dict[int, Tensor]:
        """Validate ``state_dict()["expert_bias"]`` (``None``: a state saved without it); apply nothing."""
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise TypeError(f"state_dict['expert_bias'] must be a mapping, got {type(value).__name__}")
        names = {self.layout.slots[i].name: i for i in self.routers}
        unknown = sorted(str(k) for k in value if k not in names)
        if unknown:
            raise ValueError(
                f"state_dict['expert_bias'] has biases for {unknown}, which have no ExpertBias in this "
                f"regularizer (its routers with one: {sorted(names)})"
            )
        missing = sorted(n for n in names if n not in value)
        if missing:
            raise ValueError(f"state_dict['expert_bias'] is missing the biases of {missing}")
        out: dict[int, Tensor] = {}
        for name, t in value.items():
            index = names[name]
            e = self.routers[index][1].num_experts
            what = f"state_dict['expert_bias'][{name!r}]"
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise TypeError(f"{what} must be a floating tensor, got {t!r:.80}")
            if tuple(t.shape) != (e,):
                raise ValueError(f"{what} has shape {list(t.shape)}, expected [{e}] (num_experts)")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{what} holds non-finite values: the state is damaged")
            out[index] = t
        return out

    def load(self, checked: dict[int, Tensor]) -> None:
        """Apply what :meth:`check` returned; the window starts afresh."""
        with torch.no_grad():
            for index, t in checked.items():
                self.bias(index).copy_(t)
            if self.window is not None:
                self.window.zero_()


def router_figures(counts: Tensor) -> dict[str, float]:
    """``max_violation`` (MaxVio = ``max_e load_e / mean_e load_e - 1``) and ``dead_experts``
    (experts with no token) of one router's reduced counts; both 0 when no token was routed."""
    load = counts.double()
    total = float(load.sum())
    if not total > 0:
        return {"max_violation": 0.0, "dead_experts": 0.0}
    return {
        "max_violation": float(load.max()) * load.numel() / total - 1.0,
        "dead_experts": float((load == 0).sum()),
    }
