"""Weight penalties: ``WeightL2(λ) = λ·Σ p²`` and ``WeightL1(λ) = λ·Σ |p|`` over whole parameters.

``ActivityRegularizer(model, penalties, weights={glob: WeightL2(1e-4)})`` adds them to ``loss()``.
The globs are matched against ``named_parameters()`` names (wrapper prefixes removed). The sums
ride in the step's one collective, so they are right however the parameters are held:

* a plain tensor (one process, DDP; also FSDP's unsharded parameter while a forward/backward
  holds it) is the *whole* parameter on every rank. Each rank puts ``Σ/W`` on the wire, so the
  reduced value is ``Σ`` once, not ``W`` times. Through the surrogate's factor ``g`` its gradient
  is ``(g/W)·λ·f'(p)`` on every rank, and the gradient reduction (DDP's all-reduce, FSDP's
  reduce-scatter, both averaging over ``W``) leaves ``λ·f'(p)``: the gradient of one process.
* a ``DTensor`` sharded on dimension 0 (FSDP2's ``fully_shard``) is one shard per rank. Each rank
  puts the sum over its local shard on the wire; the reduced value is the sum over the whole
  parameter. FSDP does not reduce a gradient that reaches a sharded parameter directly (it
  accumulates into the shard's ``.grad`` beside the reduce-scattered gradient of the
  forward), so the shard's gradient is scaled to exactly ``λ·f'(p_shard)``.

A regularizer may be built before or after ``fully_shard``: the parameters are looked up by name
on their modules at every ``loss()``, and each is treated as what it is at that moment.

So a plain ``λ·Σp²`` added to each worker's loss is already right under DDP. It is *not* right on
sharded parameters, where each worker holds a shard: ``λ·Σ p_shard²`` is the penalty of the shard,
not of the parameter, and its value differs per rank.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from .layout import unique_labels
from .slots import clean_name, match_glob

try:  # torch >= 2.5
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch 2.4
    from torch.distributed._tensor import DTensor, Shard  # type: ignore[no-redef]


class WeightPenalty:
    """A penalty on parameters: ``weight * Σ f(p)`` over every matched parameter, whole."""

    name: ClassVar[str] = "WeightPenalty"
    order: ClassVar[int]  #: ``f(p) = |p|^order`` summed, computed as a norm of that order

    def __init__(self, weight: float) -> None:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"{type(self).__name__}: weight must be a finite number >= 0, got {weight!r}")
        if weight < 0:
            raise ValueError(f"{type(self).__name__}: weight must be a finite number >= 0, got {weight!r}")
        self.weight = float(weight)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weight={self.weight!r})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.weight == self.weight  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.weight))


class WeightL2(WeightPenalty):
    """``weight * Σ p²`` over every element of every matched parameter (the whole parameter)."""

    name = "WeightL2"
    order = 2


class WeightL1(WeightPenalty):
    """``weight * Σ |p|`` over every element of every matched parameter (the whole parameter)."""

    name = "WeightL1"
    order = 1


class WeightTerms:
    """The weight penalties of one regularizer: which parameters, and their sums for the wire."""

    def __init__(
        self, root: nn.Module, weights: Mapping[str, WeightPenalty | Sequence[WeightPenalty]]
    ) -> None:
        if not isinstance(weights, Mapping):
            raise TypeError(
                f"weights must be a mapping {{glob: actreg.WeightL2(...)}}, got {type(weights).__name__}"
            )
        places = _parameter_places(root)
        names = list(places)
        penalties: list[WeightPenalty] = []
        refs: list[list[tuple[nn.Module, str]]] = []
        for pattern, value in weights.items():
            items = value if isinstance(value, (list, tuple)) else [value]
            for p in items:
                if not isinstance(p, WeightPenalty):
                    raise TypeError(
                        f"weights[{pattern!r}] must be actreg.WeightL2(...) / actreg.WeightL1(...) or a "
                        f"list of them, got {p!r}"
                    )
            matched = match_glob(
                pattern,
                names,
                "weights",
                "parameter",
                root,
                "Patterns are fnmatch globs over named_parameters() names (e.g. '*.weight', 'encoder.*').",
            )
            for p in items:
                penalties.append(p)
                refs.append([places[n] for n in matched])
        self.penalties = penalties
        self.labels = unique_labels(penalties)  # type: ignore[arg-type]
        self.refs = [[(module._parameters, attr) for module, attr in r] for r in refs]
        self._weights: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def __len__(self) -> int:
        return len(self.penalties)

    def describe(self) -> list[tuple[str, str, int]]:
        """(label, penalty, number of matched parameters) per penalty, for the first-step agreement."""
        triples = zip(self.labels, self.penalties, self.refs, strict=True)
        return [(label, repr(p), len(r)) for label, p, r in triples]

    @staticmethod
    def _resolve(refs: list[tuple[dict[str, Tensor | None], str]]) -> list[Tensor]:
        """The parameters registered now (``fully_shard`` swaps them); a tied one counts once."""
        out: dict[int, Tensor] = {}
        for params, attr in refs:
            p = params.get(attr)
            if p is not None:
                out.setdefault(id(p), p)
        return list(out.values())

    def block(self, dtype: torch.dtype, device: torch.device, world: int, g: float) -> Tensor:
        """This rank's contribution to the wire: one sum per penalty (see the module docstring).

        ``world`` ranks share the wire (1 when the step does not communicate); ``g`` is the
        surrogate's gradient factor.
        """
        sums = []
        for p, refs in zip(self.penalties, self.refs, strict=True):
            params = self._resolve(refs)
            plain = [t for t in params if not isinstance(t, DTensor)]
            shards = [_local_shard(t) for t in params if isinstance(t, DTensor)]
            total: Tensor | None = None
            if plain:
                total = _power_sum(plain, p.order, dtype) / world
            if shards:
                if world == 1 and any(t.device_mesh.size() > 1 for t in params if isinstance(t, DTensor)):
                    raise ValueError(
                        "weight penalties on sharded parameters (FSDP2 DTensors) need the step's "
                        "collective, and this step communicates nothing (sync='local'): use "
                        "sync='global' or 'ema'"
                    )
                s = _power_sum(shards, p.order, dtype, grad_scale=1.0 / g)  # gradient exactly λ f'(p)
                total = s if total is None else total + s
            sums.append(torch.zeros((), dtype=dtype, device=device) if total is None else total.to(device))
        return torch.stack(sums)  # type: ignore[arg-type]

    def parameters(self) -> list[Tensor]:
        """Every matched parameter as registered now (each once)."""
        return self._resolve([ref for refs in self.refs for ref in refs])

    def coefficients(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (dtype, device)
        if key not in self._weights:
            self._weights[key] = torch.tensor([p.weight for p in self.penalties], dtype=dtype, device=device)
        return self._weights[key]


def _parameter_places(root: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Clean parameter name -> (owning module, attribute), for every parameter of ``root``."""
    out: dict[str, tuple[nn.Module, str]] = {}
    for prefix, module in root.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is None:
                continue
            name = clean_name(f"{prefix}.{attr}" if prefix else attr)
            out.setdefault(name, (module, attr))
    return out


def _local_shard(t: Tensor) -> Tensor:
    placements = t.placements  # type: ignore[attr-defined]
    if not all(isinstance(pl, Shard) for pl in placements):
        raise ValueError(
            f"weight penalties support parameters sharded on every mesh dimension (FSDP2 "
            f"fully_shard); got placements {placements}: replicated or partial DTensors are not "
            "supported yet"
        )
    return t.to_local()  # type: ignore[attr-defined]


def _power_sum(tensors: list[Tensor], order: int, dtype: torch.dtype, grad_scale: float = 1.0) -> Tensor:
    """``Σ |t|^order`` over all elements of all ``tensors`` (see :class:`PowerSum`)."""
    return PowerSum.apply(order, dtype, grad_scale, *tensors)


class PowerSum(torch.autograd.Function):
    """``PowerSum.apply(order, dtype, grad_scale, *tensors) = Σ_t Σ |t|^order`` (order 1 or 2).

    One autograd node for any number of parameters: forward is one fused norm per order
    (``_foreach_norm``, in ``dtype``), backward ``grad_scale·order·|t|^(order-1)·sign(t)·g`` for all
    tensors in one or two ``_foreach`` ops -- not a chain of ops per parameter.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: object, order: int, dtype: torch.dtype, grad_scale: float, *tensors: Tensor
    ) -> Tensor:
        ctx.order, ctx.grad_scale = order, grad_scale  # type: ignore[attr-defined]
        ctx.save_for_backward(*tensors)  # type: ignore[attr-defined]
        stacked = torch.stack(torch._foreach_norm(list(tensors), order, dtype=dtype))
        return stacked.square().sum() if order == 2 else stacked.sum()

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        tensors = list(ctx.saved_tensors)  # type: ignore[attr-defined]
        scale = ctx.grad_scale * ctx.order  # type: ignore[attr-defined]
        factor = grad * scale if scale != 1.0 else grad
        if ctx.order == 2:  # type: ignore[attr-defined]
            grads = torch._foreach_mul(tensors, factor)
        else:
            grads = torch._foreach_sign(tensors)
            torch._foreach_mul_(grads, factor)
        return (None, None, None, *grads)

