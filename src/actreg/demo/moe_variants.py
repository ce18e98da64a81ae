"""The balancing variants of ``actreg moe``: each one's regularizer and how the model routes.

Every variant trains the same model from the same initial weights on the same micro-batches; they
differ only in what balances the routers (one entry per router ``blocks.<i>.moe.router``, its
logits fed with ``reg.observe``):

* ``none`` -- nothing;
* ``micro`` -- ``LoadBalance(E, k, coef)`` with ``sync="local"``: each rank's loss on its own
  micro-batch, what a data-parallel framework computes by default (Switch, GShard, Mixtral;
  Megatron's ``aux_loss`` without tensor or context parallelism);
* ``global`` -- the same penalty, same weight, with ``sync="global"``: ``f`` and ``P`` of the
  global micro-batch (every rank's micro-batch of this accumulation step);
* ``window`` -- ``LoadBalance(E, k, coef, counts="window")``, ``sync="global"``: ``f`` from the
  counts of every micro-batch of the optimizer step so far on every rank (Qwen's Algorithm 1 with a
  buffer, Megatron's ``global_aux_loss``), ``P`` of the current global micro-batch;
* ``bias`` -- ``ExpertBias(E, k, rate)``: no loss, an expert bias added to the scores for the
  top-k choice only, moved once per optimizer step by the sign of each expert's load against the
  mean over the optimizer step's whole batch (DeepSeek-V3's aux-loss-free balancing);
* ``bias+seq`` -- the bias plus ``SequenceBalance(E, k, seq_coef, sequences)`` over each sequence's
  tokens (DeepSeek-V3's recipe: a small complementary sequence-wise loss).

All balance losses are divided by the number of micro-batches, like the task loss; the window and
the biases are closed / moved by ``reg.attach(optimizer)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import actreg

from .moe_config import MoEConfig
from .moe_lm import MoELM, Routing, top_k_routing

#: variant -> one line for the report
DESCRIPTIONS = {
    "none": "no balancing",
    "micro": "LoadBalance per micro-batch per rank (sync='local')",
    "global": "LoadBalance over the global micro-batch (sync='global')",
    "window": "LoadBalance, f over the optimizer step's window (counts='window')",
    "bias": "ExpertBias from the global counts of the optimizer step (aux-loss-free)",
    "bias+seq": "ExpertBias + SequenceBalance (DeepSeek-V3)",
}


@dataclass
class Balancer:
    """A variant's regularizer (``None`` for ``none``) and the routing function the model uses;
    ``set_sequences(ids)`` tells it the global sequence index of each row of the next micro-batch."""

    reg: actreg.ActivityRegularizer | None
    routing: Routing
    set_sequences: Callable[[Tensor], None]

    def loss(self) -> Tensor | None:
        return None if self.reg is None else self.reg.loss()


def build_balancer(
    variant: str, model: MoELM, cfg: MoEConfig, world_size: int, optimizer: torch.optim.Optimizer
) -> Balancer:
    """The regularizer of ``variant`` on ``model``'s routers, attached to ``optimizer`` when it has a
    window or biases to close once per optimizer step."""
    e, k = cfg.experts, cfg.top_k
    names = model.router_names()
    sequences: list[Tensor | None] = [None]

    def set_sequences(ids: Tensor) -> None:
        sequences[0] = ids

    if variant == "none":
        return Balancer(None, top_k_routing(k), set_sequences)
    if variant in ("micro", "global"):
        penalties: dict[str, list[actreg.Penalty]] = {n: [actreg.LoadBalance(e, k, cfg.coef)] for n in names}
    elif variant == "window":
        penalties = {n: [actreg.LoadBalance(e, k, cfg.coef, counts="window")] for n in names}
    elif variant == "bias":
        penalties = {n: [actreg.ExpertBias(e, k, cfg.bias_rate)] for n in names}
    elif variant == "bias+seq":
        rows = world_size * cfg.micro_batch
        penalties = {
            n: [actreg.ExpertBias(e, k, cfg.bias_rate), actreg.SequenceBalance(e, k, cfg.seq_coef, rows)]
            for n in names
        }
    else:
        raise ValueError(f"unknown variant {variant!r}")
    sync = "local" if variant == "micro" else "global"
    reg = actreg.ActivityRegularizer(model, penalties, sync=sync, observed=names)
    biased = variant.startswith("bias")
    if variant in ("window", "bias", "bias+seq"):
        reg.attach(optimizer)

    def route(name: str, logits: Tensor) -> Tensor:
        ids = sequences[0]
        if ids is not None and variant == "bias+seq":
            reg.observe(name, logits, sequence=ids[:, None])
        else:
            reg.observe(name, logits)
        return reg.route(name, logits) if biased else torch.topk(logits.detach(), k, dim=-1).indices

    return Balancer(reg, route, set_sequences)
