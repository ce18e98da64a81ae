"""Worker functions for tests/test_mesh.py: actreg on the data-parallel dimension of a 2-D device mesh.

Run by a 4-rank ``WorkerPool`` as a 2 x 2 mesh ``("dp", "tp")``: ranks ``{0, 2}`` and ``{1, 3}`` are
the two data-parallel groups (one per tensor-parallel coordinate). The data depend on both
coordinates -- the shard on the dp coordinate (uneven: 5 and 2 samples), the batch on the tp
coordinate -- so that a reduction over the wrong group would be visible.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP

import actreg
from dist_cases import make_penalty
from problem import CASES, DECAY, LR, batch, make_model, shard_bounds

MESH = (2, 2)
STEPS = 2


def group_batch(step: int, group: int) -> tuple[Tensor, Tensor]:
    """The global batch of data-parallel group ``group`` (its tp coordinate) at ``step``."""
    return batch(step + 100 * group)


def mesh_train(rank: int, world_size: int, names: list[str], sync: str) -> dict[str, Any]:
    """Per penalty: DDP over the dp group, actreg with ``process_group`` = the dp group; returns this
    rank's coordinates and its per-step losses and (dp-averaged) gradients."""
    mesh = init_device_mesh("cpu", MESH, mesh_dim_names=("dp", "tp"))
    dp = mesh.get_group("dp")
    dp_rank, tp_rank = mesh.get_local_rank("dp"), mesh.get_local_rank("tp")
    start, stop = shard_bounds(dp_rank, MESH[0])
    out: dict[str, Any] = {"dp": dp_rank, "tp": tp_rank}
    for name in names:
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        net = DDP(model, process_group=dp)
        reg = actreg.ActivityRegularizer(
            net, {CASES[name][1]: make_penalty(name)}, sync=sync, decay=DECAY, process_group=dp
        )
        losses, grads = [], []
        for step in range(STEPS):
            x, mask = group_batch(step, tp_rank)
            opt.zero_grad()
            with reg.mask(mask[start:stop]):
                y = net(x[start:stop])
            loss = reg.loss()
            (loss + 0.0 * y.sum()).backward()
            losses.append(loss.item())
            grads.append([p.grad.detach().numpy().copy() for p in model.parameters()])
            opt.step()
        reg.check()
        reg.remove()
        out[name] = {"loss": losses, "grads": grads}
    return out


def tp_weights(rank: int, world_size: int) -> dict[str, Any]:
    """Weight penalties on tensor-parallel parameters of the 2 x 2 mesh (no forward needed).

    ``0.weight`` is ``ColwiseParallel`` over "tp" (``Shard(0)``) and ``2.weight`` is laid out as
    HSDP would (``Replicate`` on "dp", ``Shard(0)`` on "tp"). A regularizer on the dp group (or on
    every rank) would count the local tp shard once per rank of its group and miss the other
    shard: each is refused, on every rank. On the tp group -- the ranks the shards lie on -- the
    penalty is the whole parameter's, and the gradient on each shard exactly ``λ f'(p)``.
    """
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", MESH, mesh_dim_names=("dp", "tp"))
    model = make_model()
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel()})
    hsdp = distribute_tensor(model[2].weight.detach(), mesh, [Replicate(), Shard(0)])
    model[2].weight = torch.nn.Parameter(hsdp)
    out: dict[str, Any] = {"dp": mesh.get_local_rank("dp"), "tp": mesh.get_local_rank("tp"), "refused": {}}
    for name, group in (("0.weight", mesh.get_group("dp")), ("2.weight", None)):  # None: every rank
        reg = actreg.ActivityRegularizer(model, {}, weights={name: actreg.WeightL2(0.3)}, process_group=group)
        try:
            out["refused"][name] = f"no error: {reg.loss().item()}"
        except ValueError as err:
            out["refused"][name] = str(err)
        reg.remove()
    out["exact"] = {}
    for name in ("0.weight", "2.weight"):
        reg = actreg.ActivityRegularizer(
            model, {}, weights={name: actreg.WeightL2(0.3)}, process_group=mesh.get_group("tp")
        )
        model.zero_grad()
        loss = reg.loss()
        loss.backward()
        param = model.get_parameter(name)
        out["exact"][name] = {
            "loss": loss.item(),
            "grad": param.grad.full_tensor().detach().numpy().copy(),  # type: ignore[union-attr]
            "placements": str(tuple(param.placements)),  # type: ignore[attr-defined]
        }
        reg.remove()
    return out
