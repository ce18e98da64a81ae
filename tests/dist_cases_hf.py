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


# --- every transformers family that computes load_balancing_loss_func --------------------------
#
# family -> (module under transformers.models, model class, settings beyond the common tiny ones,
# settings of its text_config, the number of layers whose router logits the model outputs). Tiny
# configs are the family's defaults with every size in SMALL that the family has; 4 experts, top-2,
# coefficient 0.02. The layer counts record what each family pools: Qwen2-MoE only every
# ``decoder_sparse_step``-th layer, Flint not its ``mlp_only_layers``, DeepSeek-V4 not its hash-routed
# layers, Jamba only every ``expert_layer_period``-th layer, Ernie 4.5 not before ``moe_layer_start_index``,
# Ernie 4.5 VL not its ``"dense"`` ``mlp_layer_types``.
COEF = 0.02
SMALL: dict[str, Any] = dict(
    vocab_size=64, hidden_size=32, d_model=32, intermediate_size=32, moe_intermediate_size=16,
    shared_expert_intermediate_size=16, num_hidden_layers=2, n_layers=2, num_attention_heads=4, n_heads=4,
    num_key_value_heads=2, head_dim=8, kv_channels=8, num_local_experts=4, num_experts=4, n_routed_experts=4,
    moe_num_experts=4, num_experts_per_tok=2, moe_k=2, router_aux_loss_coef=COEF, aux_loss_coef=COEF,
    max_position_embeddings=64, max_seq_len=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
    use_cache=False, first_k_dense_replace=0, n_shared_experts=1, num_shared_experts=1, n_group=1,
    topk_group=1,
)
ENCODER: dict[str, Any] = dict(
    depth=1, num_hidden_layers=1, encoder_layers=1, hidden_size=32, intermediate_size=32, num_heads=2,
    num_attention_heads=2, encoder_attention_heads=2, encoder_ffn_dim=32, out_hidden_size=32, embed_dim=32,
    d_model=32, output_dim=32, deepstack_visual_indexes=[], num_key_value_heads=2,
)
FAMILIES: dict[str, tuple[str, dict[str, Any], dict[str, Any], int]] = {
    "dbrx": ("DbrxForCausalLM", {}, {}, 2),
    "deepseek_v4": ("DeepseekV4ForCausalLM", dict(
        num_hidden_layers=3, mlp_layer_types=["hash_moe", "moe", "moe"], head_dim=16, qk_rope_head_dim=8,
        q_lora_rank=16, o_lora_rank=16, o_groups=2, index_n_heads=2, index_head_dim=8, index_topk=4,
        num_key_value_heads=1, sliding_window=8, hc_mult=2), {}, 2),
    "ernie4_5_moe": ("Ernie4_5_MoeForCausalLM", {}, {}, 1),
    # text and vision experts (a gate each) write one [batch * seq, E] tensor a layer; layer 0 dense
    "ernie4_5_vl_moe": ("Ernie4_5_VLMoeForConditionalGeneration", {}, dict(
        moe_intermediate_size=[16, 16], moe_num_shared_experts=1, rope_parameters={
            "rope_type": "default", "rope_theta": 500000.0, "mrope_section": [1, 1, 2]}), 1),
    "flex_olmo": ("FlexOlmoForCausalLM", {}, {}, 2),
    "flint": ("FlintForCausalLM", dict(num_hidden_layers=3, mlp_only_layers=[0]), {}, 2),
    "glm4v_moe": ("Glm4vMoeForConditionalGeneration", {}, dict(head_dim=16, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
        "partial_rotary_factor": 0.5}), 2),
    "glm5_next": ("Glm5NextForConditionalGeneration", {}, dict(
        num_hidden_layers=3, mlp_layer_types=["dense", "sparse", "sparse"], num_key_value_heads=4,
        kv_lora_rank=16, q_lora_rank=16, v_head_dim=8, qk_nope_head_dim=8, qk_head_dim=8, index_topk=4,
        index_kpool=2, index_head_dim=8, index_n_heads=2, linear_head_dim=8, linear_num_heads=4,
        hc_mult=2), 2),
    "gpt_oss": ("GptOssForCausalLM", {}, {}, 2),
    "granitemoe": ("GraniteMoeForCausalLM", {}, {}, 2),
    "granitemoe_swa": ("GraniteMoeSWAForCausalLM", {}, {}, 2),
    "granitemoehybrid": ("GraniteMoeHybridForCausalLM", dict(
        mamba_n_heads=8, mamba_d_head=8, mamba_d_state=16, mamba_chunk_size=16), {}, 2),
    "granitemoeshared": ("GraniteMoeSharedForCausalLM", {}, {}, 2),
    "jamba": ("JambaForCausalLM", {}, {}, 1),
    "jetmoe": ("JetMoeForCausalLM", {}, {}, 4),  # two routers a layer: attention and MLP experts
    "laguna": ("LagunaForCausalLM", {}, {}, 1),
    "lara_mini": ("LaraMiniForCausalLM", {}, {}, 2),
    "mellum": ("MellumForCausalLM", {}, {}, 2),
    "minimax": ("MiniMaxForCausalLM", {}, {}, 2),
    "minimax_m2": ("MiniMaxM2ForCausalLM", {}, {}, 2),
    "minimax_m3_vl": ("MiniMaxM3SparseForConditionalGeneration", {}, dict(
        dense_intermediate_size=32, shared_intermediate_size=16, rotary_dim=4, index_n_heads=2,
        index_head_dim=8, index_block_size=4, index_topk_blocks=2), 2),
    "mixtral": ("MixtralForCausalLM", {}, {}, 2),
    "olmoe": ("OlmoeForCausalLM", {}, {}, 2),
    "phimoe": ("PhimoeForCausalLM", {}, {}, 2),
    "qwen2_moe": ("Qwen2MoeForCausalLM", dict(num_hidden_layers=4, decoder_sparse_step=2), {}, 2),
    "qwen3_5_moe": ("Qwen3_5MoeForConditionalGeneration", {}, {}, 2),
    "qwen3_moe": ("Qwen3MoeForCausalLM", {}, {}, 2),
    "qwen3_next": ("Qwen3NextForCausalLM", {}, {}, 2),
    "qwen3_omni_moe": ("Qwen3OmniMoeThinkerForConditionalGeneration", dict(vision_start_token_id=3), {}, 2),
    "qwen3_vl_moe": ("Qwen3VLMoeForConditionalGeneration", {}, {}, 2),
    "qwen4_exp": ("Qwen4ExpForCausalLM", dict(
        hc_count=2, hc_lowrank=8, ple_embed_dim=32, ngram_vocab_size_base=1000, split_ngram_parts=8,
        heads_per_ngram=2), {}, 2),
}


def _shrunk(defaults: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in SMALL.items() if k in defaults}
    out.update(extra)
    for key in ("layer_types", "mlp_layer_types", "indexer_types"):  # one entry per layer
        if isinstance(defaults.get(key), list) and key not in extra:
            out[key] = defaults[key][: out.get("num_hidden_layers", 2)]
    return out


def tiny_model(family: str) -> Any:
    """A tiny random float64 model of ``family`` (seed 0: the same weights on every rank)."""
    import importlib

    from transformers import CONFIG_MAPPING

    name, extra, text_extra, _ = FAMILIES[family]
    config_class = CONFIG_MAPPING[family]
    if family == "qwen3_omni_moe":
        config_class = type(config_class().thinker_config)
    elif family == "qwen4_exp":
        config_class = type(config_class().text_config)
    defaults = config_class().to_dict()
    settings = _shrunk(defaults, extra)
    if isinstance(defaults.get("text_config"), dict):
        settings["text_config"] = {**defaults["text_config"], **_shrunk(defaults["text_config"], text_extra)}
    for key in ("vision_config", "audio_config"):  # the encoders no text-only batch runs, at their smallest
        if isinstance(defaults.get(key), dict):
            settings[key] = {**defaults[key], **{k: v for k, v in ENCODER.items() if k in defaults[key]}}
    if family == "dbrx":
        settings["ffn_config"] = dict(
            ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2, moe_loss_weight=COEF
        )
        settings["attn_config"] = dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0)
    config = config_class(**settings, experts_implementation="eager")
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    torch.manual_seed(0)
    return getattr(module, name)(config).double()


def pooled_balance(router_logits: Any, mask: torch.Tensor, experts: int = 4, top_k: int = 2) -> torch.Tensor:
    """``COEF * load_balancing_loss_func`` written out in float64: ``f_e`` (top-k counts over real
    tokens of all layers, divided by their number, not by ``k``) times ``P_e`` (mean softmax)."""
    keep = mask.reshape(-1).bool()
    counts = torch.zeros(experts, dtype=torch.float64)
    probs = torch.zeros(experts, dtype=torch.float64)
    tokens = 0
    for logits in router_logits:
        p = torch.softmax(logits.double(), -1)[keep]
        counts = counts + torch.bincount(p.detach().topk(top_k, -1).indices.reshape(-1), minlength=experts)
        probs = probs + p.sum(0)
        tokens += int(keep.sum())
    return COEF * experts * (counts / tokens * probs / tokens).sum()


def family_batch(sequences: int = 5, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids and mask (lengths 12, 9, 7, 12, 5)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 64, (sequences, length), generator=g)
    lengths = torch.tensor([length, length - 3, length - 5, length, length - 7])[:sequences]
    mask = (torch.arange(length) < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


def vision_tokens(ids: torch.Tensor) -> torch.Tensor:
    """Ernie 4.5 VL's ``moe_mm_token_type_ids``: positions 2..4 of every sequence and all of the
    second one are vision tokens (routed by the vision experts' gate), the rest text."""
    vision = torch.zeros_like(ids)
    vision[:, 2:5] = 1
    vision[1] = 1
    return vision


def family_balance(
    rank: int, world_size: int, family: str, gradient: bool = False, vision: bool = False
) -> dict[str, Any]:
    """``family``'s tiny model, 5 sequences split 3 + 2 over 2 ranks: actreg's value of
    ``hf.load_balance(model.config)`` over all router logits (and, with ``gradient``, its
    DDP-averaged gradient); rank 0 adds, on the concatenated batch in one process, the float64
    formula (and its gradient), the model's own ``aux_loss`` and what the model adds to its loss
    with ``output_router_logits=True``. ``vision``: Ernie 4.5 VL with :func:`vision_tokens`."""
    model = tiny_model(family)
    ids, mask = family_batch()
    extra = {"moe_mm_token_type_ids": vision_tokens(ids)} if vision else {}
    rows = slice(0, 3) if rank == 0 else slice(3, 5)
    net = DDP(model, find_unused_parameters=True) if gradient else model
    reg = actreg.ActivityRegularizer(net, {"router": hf.load_balance(model.config)}, observed=["router"])
    out = net(input_ids=ids[rows], attention_mask=mask[rows], output_router_logits=True,
              **{k: v[rows] for k, v in extra.items()})
    hf.observe_router_logits(reg, out.router_logits, mask[rows])
    value = reg.loss()
    result: dict[str, Any] = {"actreg": value.item(), "rows": rows.stop - rows.start}
    if gradient:
        value.backward()
        result["actreg_grad"] = _grads(model)
    reg.check()
    if rank == 0:
        ref = tiny_model(family)
        labels = ids.masked_fill(mask == 0, -100)
        out = ref(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True, **extra)
        plain = ref(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=False, **extra)
        whole = pooled_balance(out.router_logits, mask)
        result.update(
            reference=whole.item(), own=COEF * out.aux_loss.item(), added=(out.loss - plain.loss).item(),
            layers=sum(r is not None for r in out.router_logits),
        )
        if gradient:
            ref.zero_grad()
            whole.backward()
            result["reference_grad"] = _grads(ref)
            result["gate_grad_norms"] = {  # (Ernie 4.5 VL: text_moe.gate and vision_moe.gate)
                n: 0.0 if p.grad is None else float(p.grad.norm())
                for n, p in ref.named_parameters() if n.endswith("gate.weight")
            }
    return result
