"""Turning an activation ``[..., features]`` and an optional mask into rows of positions.

Every penalty sees activations as a matrix ``[m positions, d features]``: all leading dimensions
are positions (batch, time, tokens, ...), the last one holds the features. A mask marks which
positions count; masked-out positions (padding) contribute nothing to any statistic.
"""

from __future__ import annotations

import torch
from torch import Tensor


def position_mask(x: Tensor, mask: Tensor | None) -> Tensor | None:
    """Return ``mask`` as a bool tensor of shape ``x.shape[:-1]`` (or ``None`` for "keep all").

    ``mask`` may have any shape broadcastable to the positions ``x.shape[:-1]``; a trailing
    singleton feature dimension (``[..., 1]``, a common way to store masks) is accepted too.
    Non-bool masks count positions where ``mask != 0``.
    """
    if mask is None:
        return None
    if x.dim() == 0:
        raise ValueError("activation must have at least one (feature) dimension, got a scalar")
    if mask.dim() == x.dim() and mask.dim() > 0 and mask.shape[-1] == 1:
        mask = mask.squeeze(-1)
    if mask.dtype != torch.bool:
        mask = mask != 0
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
