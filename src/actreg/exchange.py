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
    from .shifts import Shifts


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
    """A slot whose Gram matrix travels as rows: its recorded block holds ``capacity`` rows of ``d``
    centred features at ``offset``, then ``capacity`` markers, instead of the ``d * d`` Gram.

    ``kernel``: the reduced statistics keep ``R R^T`` of the ``W * capacity`` gathered rows ``R``
    and ``diag(R^T R)`` (``global`` mode: ``O(n^2 d)`` time, no ``d x d`` tensor); else the Gram
    ``R^T R`` is formed after the collective (``ema`` mode, whose moving average is ``d x d``).
    """

    offset: int
    capacity: int
    d: int
    kernel: bool = False


def rows_plan(layout: Layout) -> list[Rows | None] | None:
    """Per slot, where its rows sit in its recorded block (None: no slot exchanges rows)."""
    if not layout.rows:
        return None
    plan: list[Rows | None] = []
    for index in range(len(layout.slots)):
        d, capacity = layout.dims[index], layout.rows.get(index, 0)
        if d is None or index not in layout.rows:
            plan.append(None)
            continue
        spec = layout.record_spec(index, d)
        plan.append(Rows(spec.offsets["couter"], capacity, d, index in layout.kernels))
    return plan


class Exchanged(torch.autograd.Function):
    """``stats = Exchanged.apply(exchange, communicate, g, plan, header, *blocks)``.

    Forward: one ``cat`` of the header and every slot's block, and (``communicate``) one
    ``all_reduce(SUM)`` of it: the global sums ``S``. Backward: the surrogate's gradient ``g * grad``
    for each block, handed out by one ``split`` -- no slicing of a differentiable buffer field by
    field, no collective.

    Gram matrices at large ``d`` (``plan``: when a slot's ``W * rows * d`` is smaller than its
    ``d * d`` Gram): each rank writes its centred rows into its own region of a ``W * rows * d``
    area of the same buffer (zeros elsewhere; the markers stay home), so the one ``all_reduce``
    gathers every rank's rows ``R`` (``n = W * rows`` of them, zero rows for padding and masked
    positions, which add nothing). Then, per slot:

    - ``kernel`` (``global``): the statistics keep ``K = R R^T`` (``n x n``) and ``q = diag(R^T R)``
      (``d``): ``O(n^2 d)`` time and ``O(n d + n^2)`` memory. With ``G_K``, ``g_q`` their
      gradients, a rank's own rows ``R_w`` get ``(G_K + G_K^T)[w] R + 2 R_w diag(g_q)``.
    - else (``ema``): every rank forms the global Gram ``R^T R`` itself; the gradient of a rank's
      own Gram ``R_w^T R_w`` is ``R_w (G + G^T)`` = ``2 R_w G`` (``G`` is symmetric for the
      built-in penalties).

    Exact either way: backward computes each rank's share from the gathered rows, with no collective.
    """

    @staticmethod
    def forward(
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
        stats, saved = _from_rows(wire, header.numel(), blocks, plan, world, rank)
        ctx.save_for_backward(*saved)
        ctx.world, ctx.rank = world, rank
        return stats

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.g != 1.0:
            grad = grad * ctx.g
        if ctx.plan is None:
            return (None, None, None, None, None, *grad.split([ctx.header, *ctx.sizes])[1:])
        saved = list(ctx.saved_tensors)
        grads, at = [], ctx.header
        for size, rows in zip(ctx.sizes, ctx.plan, strict=True):
            if rows is None:
                grads.append(grad.narrow(0, at, size))
                at += size
                continue
            d, cap = rows.d, rows.capacity
            tail = size - rows.offset - cap * (d + 1)
            r = saved.pop(0)
            if rows.kernel:  # r: the gathered rows R (n x d)
                n = r.shape[0]
                g_k = grad.narrow(0, at + rows.offset, n * n).view(n, n)
                g_q = grad.narrow(0, at + rows.offset + n * n, d)
                mine = slice(ctx.rank * cap, (ctx.rank + 1) * cap)
                own = r[mine]
                g_rows = torch.addcmul((g_k[mine] + g_k[:, mine].mT) @ r, own, g_q, value=2.0)
                area = n * n + d
            else:  # r: this rank's own rows (cap x d)
                gram = grad.narrow(0, at + rows.offset, d * d).view(d, d)
                g_rows = (r @ gram).mul_(2)  # G symmetric: see statistics._centred_grad
                area = d * d
            grads.append(
                torch.cat(
                    [
                        grad.narrow(0, at, rows.offset),
                        g_rows.reshape(-1),
                        grad.new_zeros(cap),  # the markers: constants
                        grad.narrow(0, at + rows.offset + area, tail),
                    ]
                )
            )
            at += rows.offset + area + tail
        return (None, None, None, None, None, *grads)


def _spread(blocks: tuple[Tensor, ...], plan: list[Rows | None], world: int, rank: int) -> list[Tensor]:
    """The blocks as sent: each rank's rows in its own region of a ``world``-times larger area
    (the markers are not sent)."""
    pieces: list[Tensor] = []
    for block, rows in zip(blocks, plan, strict=True):
        if rows is None:
            pieces.append(block)
            continue
        area = rows.capacity * rows.d
        tail = rows.offset + area + rows.capacity
        pieces.append(block.narrow(0, 0, rows.offset))
        pieces.append(block.new_zeros(rank * area))
        pieces.append(block.narrow(0, rows.offset, area))
        pieces.append(block.new_zeros((world - 1 - rank) * area))
        pieces.append(block.narrow(0, tail, block.numel() - tail))
    return pieces


def _from_rows(
    wire: Tensor, head: int, blocks: tuple[Tensor, ...], plan: list[Rows | None], world: int, rank: int
) -> tuple[Tensor, list[Tensor]]:
    """The reduced statistics with every gathered row area replaced by the kernel and column sums
    of squares of its rows (``kernel``) or by their Gram matrix; and per such slot what the
    backward needs: all the gathered rows (``kernel``) or this rank's own."""
    out, saved, at = [wire.narrow(0, 0, head)], [], head
    for block, rows in zip(blocks, plan, strict=True):
        if rows is None:
            out.append(wire.narrow(0, at, block.numel()))
            at += block.numel()
            continue
        area = rows.capacity * rows.d
        tail = block.numel() - rows.offset - area - rows.capacity
        out.append(wire.narrow(0, at, rows.offset))
        gathered = wire.narrow(0, at + rows.offset, world * area).view(world * rows.capacity, rows.d)
        if rows.kernel:
            r = gathered.clone()  # (not a view that keeps the whole buffer)
            out.append((r @ r.mT).reshape(-1))
            out.append(r.square().sum(0))
            saved.append(r)
        else:
            out.append((gathered.mT @ gathered).reshape(-1))
            saved.append(gathered.narrow(0, rank * rows.capacity, rows.capacity).clone())
        out.append(wire.narrow(0, at + rows.offset + world * area, tail))
        at += rows.offset + world * area + tail
    return torch.cat(out), saved


def prepare_rows(blocks: dict[int, Tensor], layout: Layout, shifts: Shifts) -> None:
    """Before the step's shifts are made common (``Shifts.common``): bring every recorded block
    that holds rows to the form the layout now expects (in place in ``blocks``).

    - Rows recorded before the slot's size was agreed (:meth:`Layout.open_rows`) become the Gram
      ``R^T R`` (around the rank's own shift, which ``Shifts.common`` then moves like any Gram) when
      the slot does not exchange rows, else are zero-padded to the agreed capacity.
    - Rows of a slot that exchanges rows are moved to the step's common shift when they were
      recorded around another (the slot's first step): ``R' = R - m delta^T``, ``m`` the markers
      (masked positions stay 0), ``delta`` = common shift - own shift. ``Shifts.common`` moves the
      block's sums; in the ``"kernel"`` form the rows are not part of what it moves (see
      :meth:`Layout.activity`). Linear in the block: differentiable.

    Costs nothing in a step without such blocks (a dictionary look-up per slot that has rows).
    """
    own = shifts.local_shifts()
    for index, block in list(blocks.items()):
        d, slot = layout.dims[index], layout.slots[index]
        if d is None or not slot.gram:
            continue
        mine, target = own.get(index), shifts.current.get(index, shifts.first.get(index))
        moves = index in layout.rows and mine is not None and target is not None and mine is not target
        if not moves and block.numel() == layout.record_size(index):
            continue  # (every later step)
        have = layout.rows_in(index, d, block.numel())
        if have is None:
            continue  # a Gram, as expected
        if index not in layout.rows:
            blocks[index] = layout.as_gram(index, d, block)
            continue
        capacity = layout.rows[index]
        if have > capacity:  # (cannot happen: the capacity is the first step's largest count)
            raise ValueError(
                f"{have} rows recorded for {slot.name!r}, more than its rows capacity {capacity}"
            )
        block = layout.with_rows(index, d, block, capacity)
        if moves:
            assert mine is not None and target is not None
            delta = (target.to(mine) - mine).detach().to(block.dtype)
            at = layout.record_spec(index, d).offsets["couter"]
            rows = block.narrow(0, at, capacity * d).view(capacity, d)
            marks = block.narrow(0, at + capacity * d, capacity)
            moved = rows - marks.unsqueeze(-1) * delta
            rest = block.numel() - at - capacity * d
            keep = block.narrow(0, at + capacity * d, rest)  # the markers and what follows
            block = torch.cat([block.narrow(0, 0, at), moved.reshape(-1), keep])
        blocks[index] = block


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
        key = (
            self.layout.version,
            tuple(sorted(self.layout.rows.items())),
            tuple(sorted(self.layout.kernels.items())),
        )
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
