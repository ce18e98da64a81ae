"""Hugging Face MoE models (Mixtral style): the load balance of the global batch.

A ``MixtralForCausalLM`` called with ``output_router_logits=True`` adds
``router_aux_loss_coef * load_balancing_loss_func(router_logits, ...)`` to its loss, computed on
each rank's shard. actreg's ``LoadBalance`` computes the same quantity on the *global* batch::

    from actreg.integrations import hf

    balance = hf.load_balance(model.config)          # LoadBalance(E, k, k * router_aux_loss_coef)
    model.router_aux_loss_coef = 0.0                 # replace the per-rank term, do not add to it
    reg = actreg.ActivityRegularizer(ddp_model, {"router": balance}, observed=["router"])

    out = ddp_model(input_ids, attention_mask=attention_mask, labels=labels, output_router_logits=True)
    hf.observe_router_logits(reg, out.router_logits, attention_mask)
    loss = out.loss + reg.loss()

Three details make the values equal to Mixtral's: the router logits of a layer come flattened
``[batch * seq, E]``, so the attention mask is flattened the same way
(``attention_mask.reshape(-1).bool()``); Mixtral pools every layer into one balance, so every
layer is observed under one name; and Mixtral's ``f_e`` is not divided by ``top_k``, so the weight
is ``top_k * router_aux_loss_coef``. Nothing here imports ``transformers``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..penalties import LoadBalance
from ..regularizer import ActivityRegularizer


def load_balance(config: Any, coef: float | None = None) -> LoadBalance:
    """``LoadBalance`` at the scale of a Mixtral-style config's auxiliary loss.

    ``config``: a ``MixtralConfig`` (or any config with ``num_local_experts``,
    ``num_experts_per_tok`` and ``router_aux_loss_coef``); ``coef``: the coefficient, by default
    ``config.router_aux_loss_coef``. Observing every layer's router logits under one name then
    gives ``coef * load_balancing_loss_func(...)`` of the global batch.
    """
    missing = [a for a in ("num_local_experts", "num_experts_per_tok") if not hasattr(config, a)]
    if coef is None and not hasattr(config, "router_aux_loss_coef"):
        missing.append("router_aux_loss_coef")
    if missing:
        raise TypeError(
            f"load_balance(config): {type(config).__name__} has no {', '.join(missing)}; pass a "
            "Mixtral-style config, or build actreg.LoadBalance(num_experts, top_k, top_k * coef) yourself"
        )
    top_k = config.num_experts_per_tok
    coef = config.router_aux_loss_coef if coef is None else coef
    return LoadBalance(config.num_local_experts, top_k, top_k * coef)


def router_mask(attention_mask: Tensor | None) -> Tensor | None:
    """The positions of flattened ``[batch * seq, E]`` router logits that are real tokens."""
    return None if attention_mask is None else attention_mask.reshape(-1).bool()


def observe_router_logits(
    reg: ActivityRegularizer,
    router_logits: Sequence[Tensor | None],
    attention_mask: Tensor | None = None,
    name: str = "router",
) -> None:
    """Record every layer's router logits (``outputs.router_logits``) under one observed ``name``.

    ``attention_mask``: the ``[batch, seq]`` mask of the same forward (padding positions are
    dropped). Layers without a router (``None``) are skipped. A mask whose size does not match the
    logits' rows is a ``RecordingError`` raised, on every rank, by the next ``reg.loss()``.
    """
    mask = router_mask(attention_mask)
    for logits in router_logits:
        if logits is not None:
            reg.observe(name, logits, mask)
