"""Rank functions for tests/test_hf.py: a tiny random Mixtral under DDP on the pool's gloo ranks.

``transformers`` is imported only inside the functions, so the test process never imports it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import actreg
from actreg.integrations import hf
from dist_cases_lightning import example

LENGTH = 16


def _grads(model: torch.nn.Module) -> np.ndarray:
    return np.concatenate(
        [(torch.zeros_like(p) if p.grad is None else p.grad).detach().double().flatten().numpy()
         for p in model.parameters()]
    )


def balance(rank: int, world_size: int, sequences: int, seed: int) -> dict[str, Any]:
    """One global batch of ``sequences`` padded sequences, split unevenly: the balance term's value
    and DDP-averaged gradient from actreg and from Mixtral's own per-rank auxiliary loss; rank 0
    adds the float64 reference, ``load_balancing_loss_func`` on the whole batch."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    ex = example("hf_mixtral_ddp")
    torch.manual_seed(0)
    model = ex.MixtralForCausalLM(ex.tiny_config())
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    config = model.config
    coef, model.router_aux_loss_coef = model.router_aux_loss_coef, 0.0
    net = DDP(model, find_unused_parameters=True)  # a balance term alone does not reach lm_head
    reg = actreg.ActivityRegularizer(net, {"router": hf.load_balance(config)}, observed=["router"])
    ids, mask = ex.global_batch(seed, sequences, LENGTH, config.vocab_size)
    rows = ex.shard(rank, world_size, sequences)

    out = net(input_ids=ids[rows], attention_mask=mask[rows], output_router_logits=True)
    hf.observe_router_logits(reg, out.router_logits, mask[rows])
    value = reg.loss()
    value.backward()
    result: dict[str, Any] = {"actreg": value.item(), "actreg_grad": _grads(model)}
    result["rows"] = rows.stop - rows.start

    model.zero_grad()
    out = net(input_ids=ids[rows], attention_mask=mask[rows], output_router_logits=True)
    own = coef * out.aux_loss  # what Mixtral adds to this rank's loss
    own.backward()  # DDP averages the per-rank gradients
    result.update(own=own.item(), own_grad=_grads(model))
    reg.check()

    if rank == 0:  # the reference: HF's formula on the concatenated batch, one float64 process
        ref = ex.MixtralForCausalLM(ex.tiny_config(experts_implementation="eager"))
        ref.load_state_dict(initial)
        ref.double()
        out = ref(input_ids=ids, attention_mask=mask, output_router_logits=True)
        whole = coef * load_balancing_loss_func(
            out.router_logits, config.num_local_experts, config.num_experts_per_tok, mask
        )
        whole.backward()
        result.update(reference=whole.item(), reference_grad=_grads(ref))
    return result


def run_example(rank: int, world_size: int, argv: list[str]) -> dict[str, list[float]]:
    """``examples/hf_mixtral_ddp.py``'s ``main`` on this rank (the process group exists already)."""
    return example("hf_mixtral_ddp").main(argv)
