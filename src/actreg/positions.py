"""Turning an activation ``[..., features]`` and an optional mask into rows of positions.

Every penalty sees activations as a matrix ``[m positions, d features]``: all leading dimensions
are positions (batch, time, tokens, ...), the last one holds the features. A mask marks which
positions count; masked-out positions (padding) contribute nothing to any statistic. A mask is a
bool tensor (True = keep): an integer or float attention mask is refused with a ``TypeError``
rather than guessed at.
"""

from __future__ import annotations

import torch
from torch import Tensor


def require_bool_mask(mask: object, call: str) -> None:
    """Raise ``TypeError`` unless ``mask`` is ``None`` or a bool tensor; ``call`` names the API call."""
    if mask is None or (isinstance(mask, Tensor) and mask.dtype == torch.bool):
        return
    got = f"a {mask.dtype} tensor" if isinstance(mask, Tensor) else f"a {type(mask).__name__}"
    rank = f" on rank {torch.distributed.get_rank()}" if torch.distributed.is_initialized() else ""
    raise TypeError(
        f"{call}: the mask must be a bool tensor (True keeps a position), got {got}{rank}; an integer "
        "or float attention mask (1 = keep, 0 = padding) is not taken as is: pass mask.bool()"
    )


def position_mask(x: Tensor, mask: Tensor | None) -> Tensor | None:
    """Return ``mask`` as a bool tensor of shape ``x.shape[:-1]`` (or ``None`` for "keep all").

    ``mask`` may have any shape broadcastable to the positions ``x.shape[:-1]``; a trailing
    singleton feature dimension (``[..., 1]``, a common way to store masks) is accepted too.
    A mask that is not bool is a ``TypeError`` (see :func:`require_bool_mask`).
    """
    if mask is None:
        return None
    if x.dim() == 0:
        raise ValueError("activation must have at least one (feature) dimension, got a scalar")
    if mask.dim() == x.dim() and mask.dim() > 0 and mask.shape[-1] == 1:
        mask = mask.squeeze(-1)
    require_bool_mask(mask, "mask")
    try:
        return torch.broadcast_to(mask.to(x.device), x.shape[:-1])
    except RuntimeError as err:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast over the positions "
            f"{tuple(x.shape[:-1])} of an activation of shape {tuple(x.shape)}"
        ) from err


def positions(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Return the kept positions of ``x`` as a ``[m, d]`` matrix (``d = x.shape[-1]``)."""
    if x.dim() == 0:
        raise ValueError("activation must have at least one (feature) dimension, got a scalar")
    rows = x.reshape(-1, x.shape[-1])
    keep = position_mask(x, mask)
    if keep is None:
        return rows
    return rows[keep.reshape(-1)]
