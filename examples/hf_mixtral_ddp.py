"""A Hugging Face Mixtral MoE under DDP, balanced on the global batch by actreg.

    pip install "actreg[hf]"
    torchrun --nproc-per-node 2 examples/hf_mixtral_ddp.py
    python examples/hf_mixtral_ddp.py                  # one process

A tiny random ``MixtralForCausalLM`` (no download) learns synthetic token sequences with padding;
the ranks hold uneven shards (5 sequences over 2 ranks). actreg's ``LoadBalance`` of all layers'
router logits, observed under one name, replaces Mixtral's per-rank auxiliary loss: every rank
optimizes the load balance of the global batch, exactly Mixtral's ``load_balancing_loss_func`` on
the concatenated batch, with one ``all_reduce`` per step. The script prints both: the per-rank
loss each rank would have optimized differs from rank to rank and from the global one.

Plain DDP, not ``Trainer``/``accelerate``: the plain loop starts in seconds on CPU. With
``Trainer`` do not add ``reg.loss()`` in a ``compute_loss`` override as written here -- the Trainer
scales what ``compute_loss`` returns (by the world size under ``average_tokens_across_devices``, and
not by the accumulation steps), which would make the balance k times too strong; use
``actreg.integrations.hf.RegularizedTrainer``, which adds it after that scaling.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import MixtralConfig, MixtralForCausalLM

import actreg
from actreg.integrations import hf


def tiny_config(**extra: object) -> MixtralConfig:
    """2 layers of 4 experts, top-2, Mixtral's auxiliary coefficient 0.02 (``extra``: more settings)."""
    return MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.02,
        max_position_embeddings=64,
        use_cache=False,
        **extra,
    )


def global_batch(step: int, sequences: int, length: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of the step's global batch: ramps ``t, t+1, ...`` mod vocab,
    right-padded to ``length`` (the same on every rank; each takes its shard)."""
    g = torch.Generator().manual_seed(step)
    starts = torch.randint(0, vocab, (sequences, 1), generator=g)
    ids = (starts + torch.arange(length)) % vocab
    lengths = torch.randint(length // 2, length + 1, (sequences, 1), generator=g)
    mask = (torch.arange(length) < lengths).long()
    return ids.masked_fill(mask == 0, 0), mask


def shard(rank: int, world: int, n: int) -> slice:
    """Rank ``rank``'s rows of ``n``: uneven when ``world`` does not divide ``n`` (5 -> 3 + 2)."""
    sizes = [n // world + (r < n % world) for r in range(world)]
    return slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))


def main(argv: Sequence[str] | None = None) -> dict[str, list[float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--sequences", type=int, default=5, help="global batch")
    p.add_argument("--length", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args(argv)

    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("gloo")
    distributed = dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1

    torch.manual_seed(0)  # the same initial weights on every rank
    model = MixtralForCausalLM(tiny_config())
    balance = hf.load_balance(model.config)  # LoadBalance(4, 2, 2 * 0.02): Mixtral's scale
    coef, model.router_aux_loss_coef = model.router_aux_loss_coef, 0.0  # replaced, not added to
    net = DDP(model) if distributed else model
    reg = actreg.ActivityRegularizer(net, {"router": balance}, observed=["router"])
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr)

    history: dict[str, list[float]] = {"global_balance": [], "rank_balance": []}
    for step in range(args.steps):
        ids, mask = global_batch(step, args.sequences, args.length, model.config.vocab_size)
        mine = shard(rank, world, args.sequences)
        out = net(
            input_ids=ids[mine],
            attention_mask=mask[mine],
            labels=ids[mine].masked_fill(mask[mine] == 0, -100),
            output_router_logits=True,
        )
        hf.observe_router_logits(reg, out.router_logits, mask[mine])
        balance_loss = reg.loss()  # the global batch's balance, identical on every rank
        loss = out.loss + balance_loss  # out.loss: this rank's language-model loss only
        opt.zero_grad()
        loss.backward()
        opt.step()
        history["global_balance"].append(balance_loss.item())
        history["rank_balance"].append(coef * out.aux_loss.item())  # what Mixtral would have added here
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(
                f"step {step:3d}  lm loss {out.loss.item():.4f}  global balance "
                f"{history['global_balance'][-1]:.6f}  rank 0's own balance {history['rank_balance'][-1]:.6f}"
            )
    reg.check()  # errors of the last step are raised by the next call: make that call
    return history


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        dist.destroy_process_group()
