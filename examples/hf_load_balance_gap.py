"""How far Mixtral's per-rank auxiliary loss is from the load balance of the global batch.

    pip install "actreg[hf]"
    python examples/hf_load_balance_gap.py                      # 2 ranks, 5 sequences, 20 batches
    python examples/hf_load_balance_gap.py --ranks 4 --sequences 8

Under DDP each rank adds ``coef * load_balancing_loss_func`` of its own shard and DDP averages the
gradients, so the objective is the mean of per-shard balances. This script computes, in one
float64 process (the per-shard terms are exactly what each rank computes), that objective's value
and gradient and those of the global batch's balance (``load_balancing_loss_func`` on the
concatenated batch, which actreg's ``LoadBalance`` equals -- tests/test_hf.py checks that under
DDP), for random padded batches split unevenly over the ranks with the tiny random Mixtral of
``examples/hf_mixtral_ddp.py``. It prints the median relative errors.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func


def _example() -> ModuleType:
    """``examples/hf_mixtral_ddp.py`` (its config, batches and shards)."""
    path = Path(__file__).with_name("hf_mixtral_ddp.py")
    spec = importlib.util.spec_from_file_location("hf_mixtral_ddp", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("hf_mixtral_ddp", module)
    spec.loader.exec_module(module)
    return module


def balance(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[float, list[torch.Tensor]]:
    """``coef * load_balancing_loss_func`` of one batch, and its gradient."""
    config = model.config
    out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    value = config.router_aux_loss_coef * load_balancing_loss_func(
        out.router_logits, config.num_local_experts, config.num_experts_per_tok, mask
    )
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return value.item(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def gap(args: argparse.Namespace) -> dict[str, float]:
    ex = _example()
    torch.manual_seed(0)
    # float64; the "eager" experts (a loop over experts) run in float64, fused kernels may not
    model = ex.MixtralForCausalLM(ex.tiny_config(experts_implementation="eager")).double()
    value_err, grad_err, cosines = [], [], []
    for b in range(args.batches):
        ids, mask = ex.global_batch(1000 + b, args.sequences, args.length, model.config.vocab_size)
        whole, g_whole = balance(model, ids, mask)
        values, grads = [], []
        for r in range(args.ranks):
            rows = ex.shard(r, args.ranks, args.sequences)
            v, g = balance(model, ids[rows], mask[rows])
            values.append(v)
            grads.append(g)
        per_rank = sum(values) / args.ranks  # DDP: the mean of per-rank losses and gradients
        g_rank = torch.cat([sum(gs).flatten() / args.ranks for gs in zip(*grads, strict=True)])
        g_global = torch.cat([g.flatten() for g in g_whole])
        value_err.append(abs(per_rank - whole) / whole)
        grad_err.append(((g_rank - g_global).norm() / g_global.norm()).item())
        cosines.append(torch.nn.functional.cosine_similarity(g_rank, g_global, dim=0).item())
    return {
        "value_rel_err": statistics.median(value_err),
        "grad_rel_err": statistics.median(grad_err),
        "grad_cosine": statistics.median(cosines),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--sequences", type=int, default=5, help="global batch, split as evenly as possible")
    p.add_argument("--length", type=int, default=16)
    p.add_argument("--batches", type=int, default=20)
    args = p.parse_args(argv)
    result = gap(args)
    print(
        f"{args.ranks} ranks, {args.sequences} padded sequences of <= {args.length} tokens, "
        f"median of {args.batches} batches: per-rank auxiliary loss vs the global batch's balance: "
        f"value {100 * result['value_rel_err']:.3f}% off, gradient {100 * result['grad_rel_err']:.1f}% off "
        f"(cosine {result['grad_cosine']:.3f})"
    )
    return result


if __name__ == "__main__":
    main()
