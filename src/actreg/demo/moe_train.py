"""One run of ``actreg moe``: train one variant from one seed on every rank, evaluate, log raw numbers.

Per optimizer step each rank runs ``accumulation`` micro-batches of ``micro_batch`` byte windows,
each micro-batch from one domain (:func:`~actreg.demo.moe_data.domain_schedule`), adds
``(cross-entropy + balance loss) / accumulation`` to its gradients, then the ranks average their
gradients with one ``all_reduce`` (what DDP does at the window's last micro-batch), clip them to norm
1 and take an AdamW step (linear warm-up over the first 10% of the steps, cosine decay to 10%).
The seed fixes the initial weights, the domain schedule and every rank's windows, so every variant
of a seed sees the same data in the same order.

The log is raw numbers only, gathered on rank 0 (:mod:`actreg.demo.moe_metrics` derives the figures):

* ``loss`` ``[steps, micro, ranks]`` -- training cross-entropy (nats/byte) of every micro-batch;
* ``balance`` ``[steps, micro, ranks]`` -- what ``reg.loss()`` returned there (0 for ``none``);
* ``domain`` ``[steps, micro, ranks]`` -- the domain of every micro-batch;
* ``load`` ``[steps, micro, ranks, layers, E]`` -- top-k assignments per expert, counted by the
  model itself (not by actreg);
* ``eval`` -- held-out ``nll_sum`` and ``tokens`` per domain, and ``counts`` ``[layers, domains, E]``
  of the held-out routing (with the expert bias where the variant has one);
* ``train_seconds``, ``train_tokens`` (every rank's), and for ExpertBias variants
  ``library_max_violation``: actreg's own ``metrics()`` MaxVio of the last micro-batch, per router.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .data import shard_bounds
from .distributed import DistContext, gather_to_main
from .moe_config import MoEConfig
from .moe_data import Domain, domain_schedule, held_out_windows, sample_windows
from .moe_lm import MoELM
from .moe_variants import build_balancer


def build_model(cfg: MoEConfig, seed: int) -> MoELM:
    torch.manual_seed(seed)
    return MoELM(
        context=cfg.context,
        d=cfg.d,
        heads=cfg.heads,
        layers=cfg.layers,
        hidden=cfg.hidden,
        experts=cfg.experts,
        top_k=cfg.top_k,
    )


def _flat_all_reduce(ctx: DistContext, tensors: Sequence[Tensor], divide: bool) -> None:
    """Sum (``divide``: average) ``tensors`` over the ranks in place, in one collective."""
    if not ctx.distributed:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    if divide:
        flat /= ctx.world_size
    at = 0
    for t in tensors:
        t.copy_(flat[at : at + t.numel()].view_as(t))
        at += t.numel()


def _average_gradients(model: nn.Module, ctx: DistContext) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:  # an expert no token chose on this rank
            p.grad = torch.zeros_like(p)
    _flat_all_reduce(ctx, [p.grad for p in params if p.grad is not None], divide=True)


def _lr_factor(step: int, steps: int) -> float:
    warm = max(1, steps // 10)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def evaluate(model: MoELM, cfg: MoEConfig, domains: Sequence[Domain], ctx: DistContext) -> dict[str, Any]:
    """Held-out NLL and routing per domain, each rank on its share of the windows (one all_reduce)."""
    layers, e = cfg.layers, cfg.experts
    nll = torch.zeros(len(domains), dtype=torch.float64)
    tokens = torch.zeros(len(domains), dtype=torch.float64)
    counts = torch.zeros(layers, len(domains), e, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for i, dom in enumerate(domains):
            windows = held_out_windows(dom.held_out, cfg.eval_windows, cfg.context + 1)
            lo, hi = shard_bounds(windows.shape[0], ctx.world_size, ctx.rank)
            for chunk in torch.split(windows[lo:hi], 32):
                logits = model(chunk[:, :-1])
                nll[i] += F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
                ).double()
                tokens[i] += chunk[:, 1:].numel()
                counts[:, i] += model.load()
    model.train()
    _flat_all_reduce(ctx, [nll, tokens, counts], divide=False)
    return {"nll_sum": nll.tolist(), "tokens": tokens.tolist(), "counts": counts.tolist()}


def train_run(
    cfg: MoEConfig, ctx: DistContext, domains: Sequence[Domain], variant: str, seed: int
) -> dict[str, Any] | None:
    """Train ``variant`` from ``seed``; rank 0 returns the raw log (the other ranks ``None``)."""
    model = build_model(cfg, seed)
    _flat_all_reduce(ctx, [p.data for p in model.parameters()], divide=True)  # (already identical)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0, foreach=True
    )
    balancer = build_balancer(variant, model, cfg, ctx.world_size, optimizer)
    model.set_routing(balancer.routing)
    schedule = domain_schedule(seed, cfg.steps, ctx.world_size, cfg.accumulation, len(domains))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + ctx.rank)
    sequence_ids = ctx.rank * cfg.micro_batch + torch.arange(cfg.micro_batch)
    balancer.set_sequences(sequence_ids)
    steps, micro = cfg.steps, cfg.accumulation
    losses = torch.zeros(steps, micro)
    balance = torch.zeros(steps, micro)
    load = torch.zeros(steps, micro, cfg.layers, cfg.experts)
    if ctx.distributed:
        dist.barrier()
    started = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, steps)
        for m in range(micro):
            dom = domains[int(schedule[step, m, ctx.rank])]
            batch = sample_windows(dom.train, cfg.micro_batch, cfg.context + 1, generator)
            logits = model(batch[:, :-1])
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            loss = ce
            extra = balancer.loss()
            if extra is not None:
                loss = loss + extra
                balance[step, m] = extra.detach()
            (loss / micro).backward()
            losses[step, m] = ce.detach()
            load[step, m] = model.load()
        _average_gradients(model, ctx)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()  # (an attached regularizer then closes its window / moves its biases)
        optimizer.zero_grad(set_to_none=True)
    if ctx.distributed:
        dist.barrier()
    seconds = time.perf_counter() - started
    library: dict[str, float] = {}
    if balancer.reg is not None and variant.startswith("bias"):
        figures = balancer.reg.metrics()
        library = {n: figures[f"{n}/max_violation"] for n in model.router_names()}
    result = evaluate(model, cfg, domains, ctx)
    if balancer.reg is not None:
        balancer.reg.remove()
    parts = gather_to_main(ctx, (losses, balance, load))
    if not ctx.is_main:
        return None
    return {
        "variant": variant,
        "seed": seed,
        "loss": torch.stack([p[0] for p in parts], 2).tolist(),
        "balance": torch.stack([p[1] for p in parts], 2).tolist(),
        "domain": schedule.tolist(),
        "load": torch.stack([p[2] for p in parts], 2).long().tolist(),
        "eval": result,
        "train_seconds": seconds,
        "train_tokens": steps * micro * ctx.world_size * cfg.micro_batch * cfg.context,
        "library_max_violation": library,
    }
