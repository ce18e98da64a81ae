"""The regularizer's group and gradient scale from a ``DeviceMesh`` (``mesh=``, ``split_dims=``,
``average_dims=``).

Two different questions decide how a penalty of the global batch is made exact:

- **which ranks hold different positions** (samples, tokens) of the global batch -- the
  statistics are summed over them. Data parallelism splits samples, context parallelism splits
  the tokens of each sequence, and sequence parallelism splits the router's (or a norm's) input
  tokens over the tensor-parallel ranks. These are the ``split_dims``; the regularizer's group is
  the ranks that share this rank's coordinates on every *other* mesh dimension.
- **how the gradient reduction combines the ranks' gradients**: DDP/FSDP *average* over their
  dimensions (data, and context parallel as torchtitan and Megatron flatten them); Megatron
  *sums* the gradients of a replicated parameter over the tensor-parallel ranks under sequence
  parallelism. The surrogate's factor ``grad_scale`` is what the reduction divides the sum by: the
  product of the sizes of the ``average_dims`` (default: the ``split_dims``) among the
  ``split_dims``. A dimension averaged over but not split holds the same positions, hence the same
  gradient, on each of its ranks: averaging those changes nothing, so it adds no factor.

Example, DP 2 x TP 2 with sequence-parallel router inputs: ``split_dims=("dp", "tp")`` (group: all 4
ranks), ``average_dims=("dp",)`` (``grad_scale`` 2): each of the 4 ranks' surrogate gradients is
twice its share, Megatron's sum over tp and DDP's mean over dp give ``(Σ of 4 shares · 2) / 2``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch.distributed as dist

_GROUPS: dict[tuple[int, tuple[int, ...], str], Any] = {}


def _names(mesh: Any, dims: str | Sequence[str], what: str) -> tuple[str, ...]:
    names = (dims,) if isinstance(dims, str) else tuple(dims)
    known = tuple(mesh.mesh_dim_names or ())
    if not names:
        raise ValueError(f"{what} is empty: name at least one dimension of the mesh {known}")
    for name in names:
        if not isinstance(name, str) or name not in known:
            raise ValueError(f"{what}: {name!r} is not a dimension of the mesh (its dimensions: {known})")
    if len(set(names)) != len(names):
        raise ValueError(f"{what} names a dimension twice: {names}")
    return names


def mesh_group(
    mesh: Any, split_dims: str | Sequence[str] | None, average_dims: str | Sequence[str] | None
) -> tuple[Any, float]:
    """``(process_group, grad_scale)`` of this rank for the mesh dimensions that split positions
    (``split_dims``) and those whose gradients are averaged (``average_dims``, default
    ``split_dims``). ``process_group`` is ``None`` when it is the whole default group.

    Called by every rank of the mesh; a group over a part of the mesh is created by its members
    only, once per process and set of ranks.
    """
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a torch.distributed.device_mesh.DeviceMesh, got {type(mesh).__name__}")
    if not mesh.mesh_dim_names:
        raise ValueError(
            "mesh= needs named dimensions: build it with init_device_mesh(..., mesh_dim_names=(...))"
        )
    if split_dims is None:
        if mesh.ndim != 1:
            raise ValueError(
                f"mesh= with {mesh.ndim} dimensions {tuple(mesh.mesh_dim_names)} needs split_dims=: the "
                "dimensions whose ranks hold different samples or tokens of the global batch (data, "
                "context and sequence parallel; not tensor parallel with replicated activations)"
            )
        split_dims = mesh.mesh_dim_names
    split = _names(mesh, split_dims, "split_dims")
    averaged = split if average_dims is None else _names(mesh, average_dims, "average_dims")
    grad_scale = float(math.prod(mesh.size(mesh.mesh_dim_names.index(n)) for n in averaged if n in split))

    if len(split) == 1:
        return mesh.get_group(split[0]), grad_scale
    # this rank's coordinates on the other dimensions fixed, the split dimensions free
    names = list(mesh.mesh_dim_names)
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise ValueError(f"global rank {dist.get_rank()} is not a member of the mesh given as mesh=")
    index = tuple(slice(None) if n in split else coordinate[i] for i, n in enumerate(names))
    ranks = tuple(sorted(int(r) for r in mesh.mesh[index].reshape(-1).tolist()))
    if len(ranks) == dist.get_world_size():
        return None, grad_scale
    backend = str(dist.get_backend(mesh.get_group(split[0])))
    key = (id(dist.group.WORLD), ranks, backend)
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(list(ranks), backend=backend, use_local_synchronization=True)
    return _GROUPS[key], grad_scale
