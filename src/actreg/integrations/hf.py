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

The same holds for every family of transformers 5 whose model adds ``coef *
load_balancing_loss_func(outputs.router_logits, E, k, attention_mask)`` (the same function, copied
into each): DBRX, DeepSeek-V4, Ernie 4.5 MoE, FlexOlmo, Flint, GLM-4.1V-MoE, GLM-5-Next, GPT-OSS,
Granite MoE (plain, SWA, hybrid, shared), Jamba, JetMoe, Laguna, Lara-Mini, Mellum, MiniMax,
MiniMax-M2, MiniMax-M3-VL, Mixtral, OLMoE, PhiMoE, Qwen2-MoE, Qwen3-MoE, Qwen3-Next, Qwen3.5-MoE,
Qwen3-VL-MoE, Qwen3-Omni-MoE (thinker), Qwen4-Exp. What each pools is what it outputs as
``router_logits``: one tensor per *routed* layer (Qwen2-MoE: every ``decoder_sparse_step``-th layer
not in ``mlp_only_layers`` -- its shared expert and shared-expert gate are not routers; Jamba:
every ``expert_layer_period``-th; DeepSeek-V4: not its hash-routed layers; JetMoe: two routers a
layer, attention and MLP experts), every padding position masked, top-k on the softmax of those
logits whatever the model routes with, ``f_e`` not divided by ``k``. ``load_balance`` reads ``E``,
``k`` and the coefficient where the model reads them (see ``_moe_config``). Doge, Switch
Transformers and NLLB-MoE compute other formulas and are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..penalties import LoadBalance
from ..regularizer import ActivityRegularizer

# Families whose auxiliary loss is not the pooled balance ``load_balancing_loss_func`` computes
# in Mixtral and the others (``model_type`` -> what it computes instead).
_OTHER_LOSSES = {
    "doge": "a balance over product-key experts (scores of two key halves, num_keys)",
    "switch_transformers": "the mean over sequences of each sequence's top-1 balance, no padding mask",
    "nllb_moe": "the mean over sequences of each sequence's top-k balance, no padding mask",
}


def _moe_config(config: Any) -> tuple[Any, str, str, str]:
    """The (sub)config that holds the MoE settings and the names of ``E``, ``k`` and the coefficient.

    The names are those the model's ``...ForCausalLM``/``...ForConditionalGeneration`` reads when it
    calls ``load_balancing_loss_func`` (transformers 5): ``num_local_experts`` or ``num_experts``
    (a config aliases one to the other through its ``attribute_map`` when it has both),
    ``num_experts_per_tok``, ``router_aux_loss_coef``; JetMoe's coefficient is ``aux_loss_coef``;
    DBRX keeps them in ``ffn_config`` as ``moe_num_experts``, ``moe_top_k``, ``moe_loss_weight``;
    multimodal models in ``text_config`` (Qwen3-Omni: ``thinker_config.text_config``).
    """
    model_type = getattr(config, "model_type", None)
    if model_type in _OTHER_LOSSES:
        raise TypeError(
            f"load_balance(config): {type(config).__name__}'s auxiliary loss is {_OTHER_LOSSES[model_type]}, "
            "not the pooled balance of load_balancing_loss_func that actreg.LoadBalance computes; "
            "hf.load_balance supports the Mixtral-style families (see actreg.integrations.hf)"
        )
    ffn = getattr(config, "ffn_config", None)
    if ffn is not None and hasattr(ffn, "moe_num_experts"):  # DBRX
        return ffn, "moe_num_experts", "moe_top_k", "moe_loss_weight"
    for sub in (config, getattr(config, "text_config", None),
                getattr(getattr(config, "thinker_config", None), "text_config", None)):
        if sub is None:
            continue
        experts = next((a for a in ("num_local_experts", "num_experts") if hasattr(sub, a)), None)
        if experts is not None:
            coef = "aux_loss_coef" if hasattr(sub, "aux_loss_coef") and not hasattr(
                sub, "router_aux_loss_coef") else "router_aux_loss_coef"
            return sub, experts, "num_experts_per_tok", coef
    return config, "num_local_experts", "num_experts_per_tok", "router_aux_loss_coef"


def load_balance(config: Any, coef: float | None = None) -> LoadBalance:
    """``LoadBalance`` at the scale of a Hugging Face MoE config's auxiliary loss.

    ``config``: the ``model.config`` of a model whose loss adds ``coef *
    load_balancing_loss_func(router_logits, E, k, attention_mask)`` (Mixtral, Qwen2-MoE, Qwen3-MoE,
    OLMoE, DBRX, JetMoe, Jamba, GPT-OSS, ... and the multimodal ones through their
    ``text_config``: the module docstring lists them); ``coef``: the coefficient, by default the
    config's (``router_aux_loss_coef``, JetMoe's ``aux_loss_coef``, DBRX's
    ``ffn_config.moe_loss_weight``). Observing every layer's router logits under one name then
    gives ``coef * load_balancing_loss_func(...)`` of the global batch. Raises ``TypeError`` for a
    config without these settings and for the families whose loss is another formula (Doge,
    Switch Transformers, NLLB-MoE).
    """
    sub, experts, top_k_name, coef_name = _moe_config(config)
    missing = [a for a in (experts, top_k_name) if getattr(sub, a, None) is None]
    if coef is None and getattr(sub, coef_name, None) is None:
        missing.append(coef_name)
    if missing:
        where = "" if sub is config else f" (in its {type(sub).__name__})"
        raise TypeError(
            f"load_balance(config): {type(config).__name__}{where} has no {', '.join(missing)}; pass "
            "the config of a Hugging Face MoE model that computes load_balancing_loss_func, or build "
            "actreg.LoadBalance(num_experts, top_k, top_k * coef) yourself"
        )
    top_k = getattr(sub, top_k_name)
    coef = getattr(sub, coef_name) if coef is None else coef
    return LoadBalance(getattr(sub, experts), top_k, top_k * coef)


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
