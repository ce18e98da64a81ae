"""Worker functions for tests/test_token_sharded.py: the group and gradient scale from a ``DeviceMesh``.

4 gloo ranks as a 2 x 2 mesh; the router problem of tests/dist_cases_moe.py (6 sequences of 5
tokens, a padding mask, sequences split 4 + 2 over data parallelism). Three layouts:

- ``dp_cp``: ``("dp", "cp")``, each sequence's tokens split 3 + 2 over cp; DDP averages over all 4
  ranks (torchtitan's flattened ``dp_cp``); ``split_dims=("dp", "cp")``.
- ``dp_tp_sp``: ``("dp", "tp")`` with *sequence-parallel* router inputs: the tokens are split over
  tp as above, the router weight is replicated; gradients are *summed* over tp (Megatron's
  reduction of a sequence-parallel parameter) and averaged over dp by DDP;
  ``split_dims=("dp", "tp"), average_dims=("dp",)`` -- ``grad_scale`` 2, not 4.
- ``dp_tp_replicated``: ``("dp", "tp")`` with the router input replicated over tp (every tp rank
  holds the whole sequences of its dp shard); DDP over dp; ``split_dims=("dp",)``.

Nothing here computes a reference: tests/test_token_sharded.py does, on the whole batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.profiler import ProfilerActivity, profile

import actreg
from dist_cases_moe import CP_SPLIT, LR, STEPS, batch, dp_bounds, make_router

#: penalty of each case (all on the router's logits), built from its source on every rank
CASES: dict[str, str] = {
    "load_softmax": "LoadBalance(num_experts=4, top_k=2, weight=0.8)",
    "load_sigmoid": "LoadBalance(num_experts=4, top_k=2, weight=0.8, score='sigmoid')",
    "seq_softmax": "SequenceBalance(num_experts=4, top_k=2, weight=0.8, num_sequences=8)",
    "seq_sigmoid": "SequenceBalance(num_experts=4, top_k=2, weight=0.8, num_sequences=8, score='sigmoid')",
    "l1": "L1(0.3)",
}


def _layout(
    names: tuple[str, str], split: tuple[str, ...], average: tuple[str, ...] | None, tokens_split: bool
) -> dict[str, Any]:
    return {"names": names, "split_dims": split, "average_dims": average, "tokens_split": tokens_split}


LAYOUTS: dict[str, dict[str, Any]] = {
    "dp_cp": _layout(("dp", "cp"), ("dp", "cp"), None, True),
    "dp_tp_sp": _layout(("dp", "tp"), ("dp", "tp"), ("dp",), True),
    # the same with average_dims left out: grad_scale 4 (the group size), as if tp averaged too
    "dp_tp_sp_default": _layout(("dp", "tp"), ("dp", "tp"), None, True),
    "dp_tp_replicated": _layout(("dp", "tp"), ("dp",), None, False),
}


def make_penalty(name: str) -> actreg.Penalty:
    return eval(CASES[name], {k: getattr(actreg, k) for k in actreg.__all__})


def train(rank: int, world_size: int, layout: str, names: list[str]) -> dict[str, Any]:
    """Per case: per-step losses, this rank's reduced gradients (as the layout's reduction leaves
    them), the collectives of each ``loss()``, and the regularizer's group and ``grad_scale``."""
    spec = LAYOUTS[layout]
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=spec["names"])
    first, second = spec["names"]
    dp_rank, other = mesh.get_local_rank(first), mesh.get_local_rank(second)
    start, stop = dp_bounds(dp_rank, 2)
    if spec["tokens_split"]:
        tokens = slice(0, CP_SPLIT) if other == 0 else slice(CP_SPLIT, None)
    else:
        tokens = slice(None)
    # DDP averages over the ranks it spans: every rank (dp x cp), or the dp group
    ddp_group = None if layout == "dp_cp" else mesh.get_group("dp")
    out: dict[str, Any] = {"rank": rank, "coords": (dp_rank, other)}
    for name in names:
        router = make_router()
        opt = torch.optim.SGD(router.parameters(), lr=LR)
        net = DDP(router, process_group=ddp_group)
        reg = actreg.ActivityRegularizer(
            net,
            {"router": make_penalty(name)},
            observed=["router"],
            mesh=mesh,
            split_dims=spec["split_dims"],
            average_dims=spec["average_dims"],
        )
        group = reg.process_group
        out["group"] = sorted(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))
        out["grad_scale"] = reg.grad_scale
        losses, grads, collectives = [], [], []
        for step in range(STEPS):
            x, mask = batch(step)
            x, mask = x[start:stop, tokens], mask[start:stop, tokens]
            ids = torch.arange(start, stop).unsqueeze(-1)
            opt.zero_grad()
            logits = net(x)
            reg.observe("router", logits, mask, **({"sequence": ids} if name.startswith("seq") else {}))
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                loss = reg.loss()
            collectives.append([e.name for e in prof.events() if e.name.startswith("c10d::")])
            (loss + 0.0 * logits.sum()).backward()
            if layout.startswith("dp_tp_sp"):  # Megatron: sequence-parallel parameters' grads summed over tp
                for p in router.parameters():
                    dist.all_reduce(p.grad, group=mesh.get_group("tp"))
            losses.append(loss.item())
            grads.append([p.grad.detach().numpy().copy() for p in router.parameters()])
            opt.step()
        reg.check()
        reg.remove()
        out[name] = {"loss": losses, "grads": grads, "collectives": collectives}
    return out


def derived_groups(rank: int, world_size: int) -> dict[str, Any]:
    """``(ranks of the group, grad_scale)`` for several meshes and dimension choices, and the errors
    of wrong arguments (the messages, raised before any collective)."""
    from actreg.meshes import mesh_group

    def ranks(group: Any) -> list[int]:
        return sorted(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))

    out: dict[str, Any] = {"rank": rank}
    square = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    cube = init_device_mesh("cpu", (2, 2, 1), mesh_dim_names=("dp", "cp", "tp"))
    line = init_device_mesh("cpu", (4,), mesh_dim_names=("dp",))
    for key, (mesh, split, average) in {
        "dp": (square, ("dp",), None),
        "cp": (square, "cp", None),
        "dp_cp": (square, ("dp", "cp"), None),
        "cp_dp": (square, ("cp", "dp"), ("dp",)),
        "cube_cp_tp": (cube, ("cp", "tp"), None),  # a group over part of the mesh, created here
        "cube_cp_tp_avg_dp": (cube, ("cp", "tp"), ("dp", "cp")),  # dp averaged but not split
        "line": (line, None, None),
    }.items():
        group, scale = mesh_group(mesh, split, average)
        out[key] = (ranks(group), scale)
    # the created group works: one all_reduce over it
    group, _ = mesh_group(cube, ("cp", "tp"), None)
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=group)
    out["cube_sum"] = t.item()
    errors: dict[str, str] = {}
    model = torch.nn.Linear(2, 2)
    for key, kwargs in {
        "no_split": {"mesh": square},
        "unknown": {"mesh": square, "split_dims": ("dp", "pp")},
        "twice": {"mesh": square, "split_dims": ("dp", "dp")},
        "both_groups": {"mesh": square, "split_dims": "dp", "process_group": square.get_group("dp")},
        "no_mesh": {"split_dims": "dp"},
        "scale_twice": {"mesh": square, "split_dims": "dp", "average_dims": "dp", "grad_scale": 2.0},
        "not_a_mesh": {"mesh": "dp", "split_dims": "dp"},
    }.items():
        try:
            actreg.ActivityRegularizer(model, {"": actreg.L1(0.1)}, **kwargs)
        except (TypeError, ValueError) as e:
            errors[key] = f"{type(e).__name__}: {e}"
    out["errors"] = errors
    return out
