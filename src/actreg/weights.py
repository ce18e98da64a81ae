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

A ``DTensor`` is summed exactly when the ranks it is sharded over -- those of its mesh dimensions
with a ``Shard`` placement, through this rank -- are exactly the ranks whose sums the step adds
(the regularizer's ``process_group``; this rank alone when the step communicates nothing). FSDP2 on
the data-parallel group qualifies; so do HSDP (``Replicate`` on the replicate dimension, ``Shard``
on the shard dimension) and tensor parallelism (``ColwiseParallel``: ``Shard`` on the tp dimension)
with a regularizer on the group of the sharded dimension. Anything else would count a shard once
per rank of the group and miss the others -- a regularizer on the dp group summing a tp shard, HSDP
with a regularizer on every rank, ``Partial`` placements -- and is a ``ValueError`` on every rank at
the first ``loss()`` naming the parameter, its placements and mesh: summing it exactly would need a
second collective, over the shard dimensions, in every step. The first ``loss()`` also compares,
across ranks, which parameters each penalty matched (clean names, global shapes, placements and that
verdict): ranks that regularize different parameters raise ``LayoutMismatchError``.

So a plain ``λ·Σp²`` added to each worker's loss is already right under DDP. It is *not* right on
sharded parameters, where each worker holds a shard: ``λ·Σ p_shard²`` is the penalty of the shard,
not of the parameter, and its value differs per rank.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .layout import unique_labels
from .slots import clean_name, match_glob

try:  # torch >= 2.5
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch 2.4
    from torch.distributed._tensor import DTensor  # type: ignore[attr-defined,no-redef,unused-ignore]


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
        return type(other) is type(self) and other.weight == self.weight

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
        names_per_penalty: list[list[str]] = []
        for pattern, value in weights.items():
            given: list[object] = list(value) if isinstance(value, (list, tuple)) else [value]
            items: list[WeightPenalty] = []
            for p in given:
                if not isinstance(p, WeightPenalty):
                    raise TypeError(
                        f"weights[{pattern!r}] must be actreg.WeightL2(...) / actreg.WeightL1(...) or a "
                        f"list of them, got {p!r}"
                    )
                items.append(p)
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
                names_per_penalty.append(list(matched))
        self.penalties = penalties
        self.labels = unique_labels(penalties)  # type: ignore[arg-type]
        self.names = names_per_penalty  #: clean names of the matched parameters, per penalty
        self.refs = [[(module._parameters, attr) for module, attr in r] for r in refs]
        self._weights: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        #: global ranks whose sums one step adds, this rank's name and whether sync is local (describe)
        self._summed: frozenset[int] | None = None
        self._who, self._local = "rank 0", False
        #: (mesh, placements) -> None if a DTensor laid out so sums exactly, else why not
        self._verdicts: dict[tuple[int, tuple[object, ...]], tuple[object, str | None]] = {}

    def __len__(self) -> int:
        return len(self.penalties)

    def describe(
        self, summed: Collection[int], who: str, sync: str
    ) -> list[tuple[str, str, tuple[str, ...]]]:
        """``(label, penalty, parameters)`` per penalty, for the first-step agreement.

        Each matched parameter is ``"name [global shape]"``; a ``DTensor`` adds its placements and
        whether it is sharded over exactly the ranks ``summed`` (the global ranks whose sums one
        step adds, see :func:`summed_ranks`), so that ranks which would sum different parameters,
        or refuse different ones, fail the agreement together. ``who`` names this rank in errors;
        ``sync`` is the regularizer's mode (the hint when ``'local'`` is what stops a DTensor).
        """
        self._summed, self._who, self._local = frozenset(summed), who, sync == "local"
        out = []
        for label, p, names, refs in zip(self.labels, self.penalties, self.names, self.refs, strict=True):
            params = []
            for name, (registered, attr) in zip(names, refs, strict=True):
                t = registered.get(attr)
                if t is None:
                    params.append(f"{name} (not registered)")
                elif isinstance(t, DTensor):
                    how = (
                        "sharded over the group" if self._verdict(t) is None else "NOT sharded over the group"
                    )
                    params.append(f"{name} {list(t.shape)} {tuple(t.placements)} {how}")
                else:
                    params.append(f"{name} {list(t.shape)}")
            out.append((label, repr(p), tuple(params)))
        return out

    def _verdict(self, t: Tensor) -> str | None:
        """None if the local shards of DTensor ``t`` sum to the whole parameter over the ranks the
        step adds (see the module docstring), else what is wrong with it (for :meth:`_refuse`)."""
        mesh, placements = t.device_mesh, tuple(t.placements)  # type: ignore[attr-defined]
        key = (id(mesh), placements)
        if key not in self._verdicts:
            self._verdicts[key] = (mesh, _verdict(mesh, placements, self._summed, self._local))
        return self._verdicts[key][1]

    def _refuse(self, penalty: WeightPenalty, t: Tensor, why: str) -> ValueError:
        name = next(
            n
            for names, refs in zip(self.names, self.refs, strict=True)
            for n, (registered, attr) in zip(names, refs, strict=True)
            if registered.get(attr) is t
        )
        return ValueError(
            f"[actreg, {self._who}] weights: {penalty!r} on parameter {name!r}, a DTensor with placements "
            f"{tuple(t.placements)} on {_mesh_text(t.device_mesh)}: {why}"  # type: ignore[attr-defined]
        )

    @staticmethod
    def _resolve(refs: list[tuple[dict[str, nn.Parameter | None], str]]) -> list[Tensor]:
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
        surrogate's gradient factor. A ``DTensor`` not sharded over exactly the ranks the step adds
        (decided by :meth:`describe` at the first ``loss()``, identically on every rank) is a
        ``ValueError``.
        """
        sums = []
        for p, refs in zip(self.penalties, self.refs, strict=True):
            params = self._resolve(refs)
            plain = [t for t in params if not isinstance(t, DTensor)]
            shards = []
            for t in params:
                if isinstance(t, DTensor):
                    why = self._verdict(t)
                    if why is not None:
                        raise self._refuse(p, t, why)
                    shards.append(t.to_local())
            total: Tensor | None = None
            if plain:
                total = _power_sum(plain, p.order, dtype) / world
            if shards:
                s = _power_sum(shards, p.order, dtype, grad_scale=1.0 / g)  # gradient exactly λ f'(p)
                total = s if total is None else total + s
            sums.append(torch.zeros((), dtype=dtype, device=device) if total is None else total.to(device))
        return torch.stack(sums)

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


def summed_ranks(group: Any, communicates: bool) -> frozenset[int]:
    """The global ranks whose weight sums one step adds: those of ``group`` (``None``: the default
    group) when the step ``communicates``, else this rank alone."""
    if not (dist.is_available() and dist.is_initialized()):
        return frozenset({0})
    if not communicates:
        return frozenset({dist.get_rank()})
    return frozenset(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))


def _verdict(
    mesh: Any, placements: tuple[Any, ...], summed: frozenset[int] | None, local: bool
) -> str | None:
    """None if a DTensor on ``mesh`` with ``placements`` is sharded over exactly the ``summed`` ranks
    (its local shards then add up to the whole parameter in the step's sum), else why not.

    The ranks it is sharded over: the sub-mesh through this rank along the mesh dimensions with a
    ``Shard`` placement (``Replicate`` dimensions hold copies: they must lie outside ``summed``).
    """
    if summed is None:  # pragma: no cover - describe() runs in the first loss(), before any block()
        raise RuntimeError("actreg internal error: weight sums requested before the first-step agreement")
    if any(not (pl.is_shard() or pl.is_replicate() or _strided(pl)) for pl in placements):
        return (
            "a Partial placement holds partial values of the parameter, not its values; weight "
            "penalties need its values (redistribute it, or use weight decay in the optimizer)"
        )
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return "this rank is not part of its mesh"
    index = tuple(
        slice(None) if pl.is_shard() or _strided(pl) else c
        for pl, c in zip(placements, coordinate, strict=True)
    )
    spread = frozenset(int(r) for r in mesh.mesh[index].flatten().tolist())
    if spread == summed:
        return None
    if local and len(spread) > 1:
        return (
            f"its shards lie on global ranks {sorted(spread)}; summing them needs the step's collective, "
            "and this step communicates nothing (sync='local'): use sync='global' or 'ema'"
        )
    return (
        f"it is sharded over global ranks {sorted(spread)}, but this regularizer sums over global ranks "
        f"{sorted(summed)} (its process_group), so the penalty would count the local shard once per "
        "rank of that group and miss the other shards. Give the weight penalty on this parameter a "
        f"regularizer whose process_group is exactly global ranks {sorted(spread)} (the group of its "
        "sharded mesh dimensions), or apply it as weight decay in the optimizer"
    )


def _mesh_text(mesh: Any) -> str:
    """``mesh dims ('dp', 'tp') = (2, 2) over global ranks [[0, 1], [2, 3]]``, for error messages."""
    names = mesh.mesh_dim_names or tuple(f"dim {i}" for i in range(mesh.ndim))
    return f"mesh dims {tuple(names)} = {tuple(mesh.mesh.shape)} over global ranks {mesh.mesh.tolist()}"


def _strided(placement: Any) -> bool:
    """FSDP2's ``_StridedShard`` (FSDP2 over tensor parallelism): a shard, not a ``Shard`` subclass."""
    return type(placement).__name__ == "_StridedShard"


def _power_sum(tensors: list[Tensor], order: int, dtype: torch.dtype, grad_scale: float = 1.0) -> Tensor:
    """``Σ |t|^order`` over all elements of all ``tensors`` (see :class:`PowerSum`)."""
    total: Tensor = PowerSum.apply(order, dtype, grad_scale, *tensors)
    return total


class PowerSum(torch.autograd.Function):
    """``PowerSum.apply(order, dtype, grad_scale, *tensors) = Σ_t Σ |t|^order`` (order 1 or 2).

    One autograd node for any number of parameters: forward is one fused norm per order
    (``_foreach_norm``, in ``dtype``), backward ``grad_scale·order·|t|^(order-1)·sign(t)·g`` for all
    tensors in one or two ``_foreach`` ops -- not a chain of ops per parameter.
    """

    @staticmethod
    def forward(
        ctx: object, order: int, dtype: torch.dtype, grad_scale: float, *tensors: Tensor
    ) -> Tensor:
        ctx.order, ctx.grad_scale = order, grad_scale  # type: ignore[attr-defined]
        ctx.save_for_backward(*tensors)  # type: ignore[attr-defined]
        stacked = torch.stack(torch._foreach_norm(list(tensors), order, dtype=dtype))
        return stacked.square().sum() if order == 2 else stacked.sum()

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple[Tensor | None, ...]:
        tensors = list(ctx.saved_tensors)  # type: ignore[attr-defined]
        scale = ctx.grad_scale * ctx.order  # type: ignore[attr-defined]
        factor = grad * scale if scale != 1.0 else grad
        if ctx.order == 2:  # type: ignore[attr-defined]
            grads = torch._foreach_mul(tensors, factor)
        else:
            grads = torch._foreach_sign(tensors)
            torch._foreach_mul_(grads, factor)
        return (None, None, None, *grads)
