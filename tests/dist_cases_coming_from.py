"""Worker functions for tests/test_coming_from.py: Megatron-Core's ``global_aux_loss`` and the expert
bias updates of torchtitan, DeepSeek-V3 and Megatron, each written here from its published source
as a plain function, next to actreg on the same ranks.

Nothing here compares: the workers return values, gradients and biases; the test compares them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import actreg

F64 = torch.float64
IN_FEATURES = 5


def make_router(experts: int) -> nn.Linear:
    torch.manual_seed(11)
    return nn.Linear(IN_FEATURES, experts).double()


def global_tokens(step: int, micro: int, tokens: int) -> Tensor:
    """The global batch ``[tokens, 5]`` of micro-batch ``micro`` of optimizer step ``step``."""
    g = torch.Generator().manual_seed(500 + 10 * step + micro)
    return torch.randn(tokens, IN_FEATURES, generator=g, dtype=F64) * 2.0


def megatron_global_aux_loss(
    probs: Tensor, routing_map: Tensor, window: dict[str, Tensor], topk: int, coeff: float
) -> Tensor:
    """Megatron-Core ``TopKRouter._apply_global_aux_loss`` + ``switch_load_balancing_loss_func``.

    ``tokens_per_expert = routing_map.sum(0)``, all-reduced (SUM) over the TP x DP x CP group (here
    the default group), added to the window buffer ``global_tokens_per_expert`` (``ga_steps`` += 1,
    both reset at each optimizer step); ``f`` is the buffer's average over the window; ``probs``
    stay local; ``total_num_tokens = num_tokens * group size``; the loss is added on each rank::

        sum_e(probs.sum(0)_e * f_e) * E * coeff / (topk * total_num_tokens**2)
    """
    tokens_per_expert = routing_map.sum(dim=0).to(torch.float32)
    dist.all_reduce(tokens_per_expert)  # reduce_from_tensor_model_parallel_region(.., tp_dp_cp_group)
    window["global_tokens_per_expert"] += tokens_per_expert
    window["ga_steps"] += 1
    averaged_tokens_per_expert = window["global_tokens_per_expert"] / window["ga_steps"]
    num_tokens = probs.shape[0]
    total_num_tokens = num_tokens * dist.get_world_size()
    num_experts = probs.shape[-1]
    aggregated_probs_per_expert = probs.sum(dim=0)
    return torch.sum(aggregated_probs_per_expert * averaged_tokens_per_expert.to(probs.dtype)) * (
        num_experts * coeff / (topk * total_num_tokens * total_num_tokens)
    )


def global_aux_loss_gradients(
    rank: int, world_size: int, tokens: int, experts: int, topk: int, coeff: float
) -> dict[str, Any]:
    """One optimizer step of one micro-batch, equal shards of ``tokens / world_size`` tokens:
    Megatron's ``global_aux_loss`` and actreg's ``LoadBalance`` at the same coefficient, each on a
    ``DistributedDataParallel`` router (gradients averaged over the ranks)."""
    x = global_tokens(0, 0, tokens)
    per = tokens // world_size
    shard = x[rank * per : (rank + 1) * per]
    out: dict[str, Any] = {}

    megatron = DistributedDataParallel(make_router(experts))
    logits = megatron(shard)
    probs = torch.softmax(logits, -1)
    routing_map = nn.functional.one_hot(torch.topk(probs, topk, -1).indices, experts).sum(-2).bool()
    window = {"global_tokens_per_expert": torch.zeros(experts), "ga_steps": torch.zeros(())}
    loss = megatron_global_aux_loss(probs, routing_map, window, topk, coeff)
    loss.backward()
    out["megatron_value"] = loss.item()
    out["megatron_grad"] = [p.grad.numpy().copy() for p in megatron.parameters()]

    model = DistributedDataParallel(make_router(experts))
    reg = actreg.ActivityRegularizer(
        model, {"router": actreg.LoadBalance(experts, topk, coeff)}, observed=["router"]
    )
    reg.observe("router", model(shard))
    loss = reg.loss()
    loss.backward()
    out["actreg_value"] = loss.item()
    out["actreg_grad"] = [p.grad.numpy().copy() for p in model.parameters()]
    reg.remove()
    return out


#: tokens of each rank per micro-batch, by world size (uneven; empty shards at W = 3)
SHARDS = {2: [[9, 3], [2, 10]], 3: [[4, 0, 8], [0, 12, 0]]}


def bias_updates(
    rank: int, world_size: int, experts: int, topk: int, rate: float, steps: int, micro: int
) -> dict[str, Any]:
    """``steps`` optimizer steps of ``micro`` micro-batches with a fixed router: actreg's
    ``ExpertBias`` next to torchtitan's update (``update="centred"``) and DeepSeek-V3 / Megatron's
    (``update="sign"``), each reference routing with its own bias and counting its own tokens."""
    out: dict[str, Any] = {}
    router = make_router(experts)
    for update in ("centred", "sign"):
        reg = actreg.ActivityRegularizer(
            router,
            {"router": actreg.ExpertBias(experts, topk, rate=rate, update=update)},
            observed=["router"],
        )
        expert_bias = torch.zeros(experts, dtype=torch.float32)  # the reference's buffers
        tokens_per_expert = torch.zeros(experts, dtype=torch.float32)
        ours, theirs, same_choice = [], [], []
        for step in range(steps):
            for m in range(micro):
                sizes = SHARDS[world_size][m]
                start = sum(sizes[:rank])
                with torch.no_grad():
                    logits = router(global_tokens(step, m, 12)[start : start + sizes[rank]])
                reg.observe("router", logits)
                reg.loss()
                # the reference router: top-k of scores + bias, counts accumulated in forward
                scores = torch.softmax(logits, -1)
                chosen = torch.topk(scores + expert_bias, topk, dim=-1).indices
                tokens_per_expert += torch.bincount(chosen.reshape(-1), minlength=experts).float()
                same_choice.append(bool(torch.equal(chosen, reg.route("router", logits))))
            if update == "centred":
                torchtitan_update(expert_bias, tokens_per_expert, rate)
            else:
                expert_bias.copy_(megatron_update(expert_bias, tokens_per_expert, rate))
                tokens_per_expert.zero_()
            reg.update_bias()
            ours.append(reg.expert_bias("router").double().numpy().copy())
            theirs.append(expert_bias.double().numpy().copy())
        out[update] = {"actreg": ours, "reference": theirs, "same_choice": same_choice}
        reg.remove()
    return out


def torchtitan_update(expert_bias: Tensor, tokens_per_expert: Tensor, coeff: float) -> None:
    """torchtitan ``_update_expert_bias`` (an optimizer step pre-hook): the ``[L, E]`` counts stacked
    and all-reduced (SUM) over the data x context-parallel mesh, then per layer (in place)."""
    stacked = torch.vstack([tokens_per_expert])
    dist.all_reduce(stacked)  # group=dp_cp_mesh.get_group(); here the default group
    with torch.no_grad():
        tokens = stacked[0]
        expert_bias_delta = coeff * torch.sign(tokens.mean() - tokens)
        expert_bias_delta = expert_bias_delta - expert_bias_delta.mean()
        expert_bias.add_(expert_bias_delta)
        tokens_per_expert.zero_()


def megatron_update(expert_bias: Tensor, local_tokens_per_expert: Tensor, rate: float) -> Tensor:
    """Megatron-Core ``get_updated_expert_bias`` (DeepSeek-V3 §2.1.2): counts all-reduced over the
    TP x DP x CP group once per optimizer step, ``bias + sign(mean - load) * rate``."""
    tokens_per_expert = local_tokens_per_expert.clone()
    dist.all_reduce(tokens_per_expert)
    average_tokens = tokens_per_expert.mean(dim=-1, keepdim=True)
    offset = average_tokens - tokens_per_expert
    return expert_bias + torch.sign(offset) * rate
