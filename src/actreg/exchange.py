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

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def surrogate(global_stats: Tensor, local_stats: Tensor, grad_scale: float) -> Tensor:
    """A tensor equal to ``global_stats`` whose gradient w.r.t. ``local_stats`` is ``grad_scale``."""
    return global_stats + grad_scale * (local_stats - local_stats.detach())


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

    def device(self) -> torch.device | None:
        """The device the backend needs tensors on (CUDA for NCCL), or None for 'any'."""
        return self._device

    def _backend_device(self) -> torch.device | None:
        if not self.distributed:
            return None
        backend = str(dist.get_backend(self.group)).lower()
        if "nccl" in backend and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return None


class Exchanged(torch.autograd.Function):
    """``wire = Exchanged.apply(exchange, communicate, g, header, *blocks)``.

    Forward: one ``cat`` of the header and every slot's block, and (``communicate``) one
    ``all_reduce(SUM)`` of it: the global sums ``S``. Backward: the surrogate's gradient ``g * grad``
    for each block, handed out by one ``split`` -- no slicing of a differentiable buffer field by
    field, no collective.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, exchange: Exchange, communicate: bool, g: float, header: Tensor, *blocks: Tensor
    ) -> Tensor:
        wire = torch.cat([header, *blocks])
        if communicate:
            exchange.sum_(wire)
        ctx.g, ctx.header = g, header.numel()
        ctx.sizes = [b.numel() for b in blocks]
        return wire

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if ctx.g != 1.0:
            grad = grad * ctx.g
        return (None, None, None, None, *grad.split([ctx.header, *ctx.sizes])[1:])
