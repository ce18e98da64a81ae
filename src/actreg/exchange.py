"""The collective and the surrogate that makes it exact (design brief §2).

Each rank holds local sums ``s_w`` (differentiable w.r.t. its own activations). One
``all_reduce(SUM)`` of ``s_w.detach()`` gives the global sums ``S``, identical on every rank. The
surrogate

    S_hat = S + g * (s_w - s_w.detach())

has the value of ``S`` and the gradient ``g`` w.r.t. ``s_w``. With ``g = W`` and gradients
*averaged* over ``W`` ranks (DDP, FSDP), the averaged gradient of ``value(S_hat)`` equals the
gradient of ``value(S)`` on the concatenated global batch -- and backward issues no collective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from .layout import HEADER, Layout

if TYPE_CHECKING:
    from .recording import Records


class Exchange:
    """All communication of one regularizer, over one (data-parallel) process group.

    Outside an initialised ``torch.distributed`` default group it behaves as a single rank.
    """

    def __init__(self, process_group: Any = None) -> None:
        self.group = process_group
        self.distributed = dist.is_available() and dist.is_initialized()
        if process_group is not None and not self.distributed:
            raise ValueError("process_group was given but torch.distributed is not initialised")
        if self.distributed:
            self.world_size = dist.get_world_size(process_group)
            self.rank = dist.get_rank(process_group)
            if self.rank < 0:
                raise ValueError(
                    f"global rank {dist.get_rank()} is not a member of the process_group given "
                    "to ActivityRegularizer; pass the data-parallel group this rank belongs to"
                )
            self.global_rank = dist.get_rank()
        else:
            self.world_size, self.rank, self.global_rank = 1, 0, 0
        self._device = self._backend_device()

    @property
    def who(self) -> str:
        """``"rank 1"`` (or ``"rank 1 (global rank 5)"`` in a subgroup), for error messages."""
        if self.global_rank != self.rank:
            return f"rank {self.rank} (global rank {self.global_rank})"
        return f"rank {self.rank}"

    def gather_objects(self, obj: object) -> list[object]:
        """Every rank's ``obj`` (a small picklable object), in rank order. Used once, for the layout."""
        if self.world_size == 1:
            return [obj]
        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def max_(self, t: Tensor) -> Tensor:
        """Element-wise maximum over ranks (in place)."""
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t

    def sum_(self, t: Tensor) -> Tensor:
        """Element-wise sum over ranks (in place): the one collective of a step."""
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def gradient_scale(self, given: float | None) -> float:
        """``g`` of the surrogate: the group size (DDP/FSDP average gradients) unless given."""
        return float(self.world_size) if given is None else float(given)

    def buffer_device(self, recorded: torch.device | None, model: torch.nn.Module) -> torch.device:
        """Where the step buffer lives: the backend's device (CUDA for NCCL), else the device of
        the recorded activations, else the model's."""
        if self._device is not None:
            return self._device
        if recorded is not None:
            return recorded
        for p in model.parameters():
            return p.device
        return torch.device("cpu")

    def _backend_device(self) -> torch.device | None:
        if not self.distributed:
            return None
        backend = str(dist.get_backend(self.group)).lower()
        if "nccl" in backend and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return None


@dataclass(frozen=True)
class Rows:
    """A slot whose Gram matrix travels as rows: its block holds ``capacity`` rows of ``d``
    centred features at ``offset`` instead of the ``d * d`` Gram."""

    offset: int
    capacity: int
    d: int


def rows_plan(layout: Layout) -> list[Rows | None] | None:
    """Per slot, where its rows sit in its recorded block (None: no slot exchanges rows)."""
    if not layout.rows:
        return None
    plan: list[Rows | None] = []
    for index in range(len(layout.slots)):
        d, capacity = layout.dims[index], layout.rows.get(index, 0)
        if d is None or not capacity:
            plan.append(None)
            continue
        spec = layout.record_spec(index, d)
        plan.append(Rows(spec.offsets["couter"], capacity, d))
    return plan


class Exchanged(torch.autograd.Function):
    """``stats = Exchanged.apply(exchange, communicate, g, plan, header, *blocks)``.

    Forward: one ``cat`` of the header and every slot's block, and (``communicate``) one
    ``all_reduce(SUM)`` of it: the global sums ``S``. Backward: the surrogate's gradient ``g * grad``
    for each block, handed out by one ``split`` -- no slicing of a differentiable buffer field by
    field, no collective.

    Gram matrices at large ``d``: when a slot's ``W * rows * d`` is smaller than its ``d * d`` Gram
    (``plan``), each rank writes its centred rows into its own region of a ``W * rows * d`` area of
    the same buffer (zeros elsewhere), so the one ``all_reduce`` gathers every rank's rows; every
    rank then forms the global Gram ``R^T R`` itself. The gradient of a rank's own Gram
    ``R_w^T R_w`` is ``R_w (G + G^T)``, computed here from the gathered rows: exact either way.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        exchange: Exchange,
        communicate: bool,
        g: float,
        plan: list[Rows | None] | None,
        header: Tensor,
        *blocks: Tensor,
    ) -> Tensor:
        ctx.g, ctx.header, ctx.plan = g, header.numel(), plan
        ctx.sizes = [b.numel() for b in blocks]
        if plan is None:
            wire = torch.cat([header, *blocks])
            if communicate:
                exchange.sum_(wire)
            return wire
        world, rank = (exchange.world_size, exchange.rank) if communicate else (1, 0)
        wire = torch.cat([header, *_spread(blocks, plan, world, rank)])
        if communicate:
            exchange.sum_(wire)
        stats, own = _gram_from_rows(wire, header.numel(), blocks, plan, world, rank)
        ctx.save_for_backward(*own)
        return stats

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if ctx.g != 1.0:
            grad = grad * ctx.g
        if ctx.plan is None:
            return (None, None, None, None, None, *grad.split([ctx.header, *ctx.sizes])[1:])
        own = list(ctx.saved_tensors)
        grads, at = [], ctx.header
        for size, rows in zip(ctx.sizes, ctx.plan, strict=True):
            if rows is None:
                grads.append(grad.narrow(0, at, size))
                at += size
                continue
            d, tail = rows.d, size - rows.offset - rows.capacity * rows.d
            gram = grad.narrow(0, at + rows.offset, d * d).view(d, d)
            r = own.pop(0)
            grads.append(
                torch.cat(
                    [
                        grad.narrow(0, at, rows.offset),
                        (r @ gram).mul_(2).reshape(-1),  # G symmetric: see statistics._centred_grad
                        grad.narrow(0, at + rows.offset + d * d, tail),
                    ]
                )
            )
            at += rows.offset + d * d + tail
        return (None, None, None, None, None, *grads)


def _spread(blocks: tuple[Tensor, ...], plan: list[Rows | None], world: int, rank: int) -> list[Tensor]:
    """The blocks as sent: each rank's rows in its own region of a ``world``-times larger area."""
    pieces: list[Tensor] = []
    for block, rows in zip(blocks, plan, strict=True):
        if rows is None:
            pieces.append(block)
            continue
        area = rows.capacity * rows.d
        pieces.append(block.narrow(0, 0, rows.offset))
        pieces.append(block.new_zeros(rank * area))
        pieces.append(block.narrow(0, rows.offset, area))
        pieces.append(block.new_zeros((world - 1 - rank) * area))
        pieces.append(block.narrow(0, rows.offset + area, block.numel() - rows.offset - area))
    return pieces


def _gram_from_rows(
    wire: Tensor, head: int, blocks: tuple[Tensor, ...], plan: list[Rows | None], world: int, rank: int
) -> tuple[Tensor, list[Tensor]]:
    """The reduced statistics with every gathered row area replaced by its Gram matrix, and each
    such slot's own rows (for the backward)."""
    out, own, at = [wire.narrow(0, 0, head)], [], head
    for block, rows in zip(blocks, plan, strict=True):
        if rows is None:
            out.append(wire.narrow(0, at, block.numel()))
            at += block.numel()
            continue
        area = rows.capacity * rows.d
        tail = block.numel() - rows.offset - area
        out.append(wire.narrow(0, at, rows.offset))
        gathered = wire.narrow(0, at + rows.offset, world * area).view(world * rows.capacity, rows.d)
        out.append((gathered.mT @ gathered).reshape(-1))
        own.append(gathered.narrow(0, rank * rows.capacity, rows.capacity).clone())  # not the whole buffer
        out.append(wire.narrow(0, at + rows.offset + world * area, tail))
        at += rows.offset + world * area + tail
    return torch.cat(out), own


class Packer:
    """What each rank puts on the wire: the header and every slot's block in layout order.

    A slot that did not run this step contributes a cached block of zeros (no op per step), so
    every rank always sends a buffer of the same size and order. A rank that failed to record sends
    a header starting with NaN (every rank then sees non-finite statistics and skips the step) and
    its rank and failing slot, so that every rank can name them.
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._zeros: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}
        self._plan: tuple[object, list[Rows | None] | None] | None = None

    def rows_plan(self) -> list[Rows | None] | None:
        """Where rows travel instead of Gram matrices (see :class:`Exchanged`); None: nowhere."""
        key = (self.layout.version, tuple(sorted(self.layout.rows.items())))
        if self._plan is None or self._plan[0] != key:
            self._plan = (key, rows_plan(self.layout))
        return self._plan[1]

    def pack(
        self, records: Records, rank: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[Tensor, list[Tensor]]:
        if records.errors:  # filled on the device: no copy from the host
            header = self._zeros_of(HEADER, dtype, device).clone()
            for i, value in enumerate((float("nan"), 1.0, float(rank), float(records.failed_slot))):
                header[i] = value
        else:
            header = self._zeros_of(HEADER, dtype, device)
        blocks = []
        for index in range(len(self.layout.slots)):
            size = self.layout.record_size(index)
            block = records.blocks.get(index)
            if block is None or block.numel() != size:  # not run (or, on a failing rank, unusable)
                block = self._zeros_of(size, dtype, device)
            elif block.dtype != dtype or block.device != device:
                block = block.to(device=device, dtype=dtype)
            blocks.append(block)
        return header, blocks

    def _zeros_of(self, size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (size, dtype, device)
        zeros = self._zeros.get(key)
        if zeros is None:
            zeros = self._zeros[key] = torch.zeros(size, dtype=dtype, device=device)
        return zeros
