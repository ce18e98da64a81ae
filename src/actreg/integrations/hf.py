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
is ``top_k * router_aux_loss_coef``. ``import actreg.integrations.hf`` does not import
``transformers`` (``RegularizedTrainer`` does, at its first use).

The same holds for every family of transformers 5 whose model adds ``coef *
load_balancing_loss_func(outputs.router_logits, E, k, attention_mask)`` (the same function, copied
into each): DBRX, DeepSeek-V4, Ernie 4.5 MoE, Ernie 4.5 VL MoE, FlexOlmo, Flint, GLM-4.1V-MoE,
GLM-5-Next, GPT-OSS, Granite MoE (plain, SWA, hybrid, shared), Jamba, JetMoe, Laguna, Lara-Mini,
Mellum, MiniMax, MiniMax-M2, MiniMax-M3-VL, Mixtral, OLMoE, PhiMoE, Qwen2-MoE, Qwen3-MoE,
Qwen3-Next, Qwen3.5-MoE, Qwen3-VL-MoE, Qwen3-Omni-MoE (thinker), Qwen4-Exp. What each pools is what
it outputs as ``router_logits``: one tensor per *routed* layer (Qwen2-MoE: every
``decoder_sparse_step``-th layer not in ``mlp_only_layers`` -- its shared expert and shared-expert
gate are not routers; Jamba: every ``expert_layer_period``-th; DeepSeek-V4: not its hash-routed
layers; JetMoe: two routers a layer, attention and MLP experts; Ernie 4.5 VL: one tensor a MoE
layer, each token's row from the gate of its modality's experts, text or vision), every padding
position masked, top-k on the softmax of those logits whatever the model routes with, ``f_e`` not
divided by ``k``. ``load_balance`` reads ``E``, ``k`` and the coefficient where the model reads
them (see ``_moe_config``). Doge, Switch Transformers and NLLB-MoE compute other formulas and are
refused.

**With the ``Trainer``** (transformers 5, with ``accelerate``, which ``Trainer`` needs), use
``RegularizedTrainer``, or put ``RegularizedTrainerMixin`` first in the bases of a ``Trainer``
subclass of yours (TRL's ``SFTTrainer``, ...)::

    balance = hf.load_balance(model.config)          # first: it reads the coefficient ...
    model.router_aux_loss_coef = 0.0                 # ... that this zeroes (the per-rank term)
    reg = actreg.ActivityRegularizer(model, {"router": balance}, observed=["router"])
    args = TrainingArguments(..., average_tokens_across_devices=True, gradient_accumulation_steps=2)
    trainer = hf.RegularizedTrainer(model=model, args=args, train_dataset=ds, regularizer=reg)
    trainer.train()                                  # under torchrun / accelerate launch

The regularizer is built on the plain model, on every rank (the Trainer wraps the model in DDP and
creates the process group later; the regularizer needs it only at its first ``loss()``). In training,
``compute_loss`` calls the model with ``output_router_logits=True``, observes every layer's router
logits under ``"router"`` with the batch's ``attention_mask`` (``router_logits=None``: observe
nothing) and adds ``reg.loss()`` at the right scale. A model whose own coefficient is not 0 is
refused with a ``ValueError`` naming it (``router_aux_loss_coef``; the multimodal models without
that attribute read ``config.text_config.router_aux_loss_coef``).

*The scale.* What the Trainer does to the loss that ``compute_loss`` returns
(``Trainer.compute_loss``, ``training_step``, ``_get_num_items_in_batch``): with
``average_tokens_across_devices`` and a model that takes loss kwargs (Mixtral, Qwen3-MoE, ...; not
those with ``accepts_loss_kwargs = False`` such as Ernie 4.5 VL), the model's LM loss is its rank's
summed cross-entropy divided by ``N``, the real labels of the whole optimizer step (every
micro-batch, every rank), and ``compute_loss`` multiplies it by the world size ``W``, so that DDP's
mean over ranks gives the token mean of the global step; ``training_step`` then takes the loss as
already scaled for accumulation and does not divide it by the ``k`` micro-batches. So a term added
inside the model's loss (Mixtral's own ``router_aux_loss_coef * aux_loss``) is multiplied by ``W``
too: its gradient is the *sum* over ranks and micro-batches of each rank's balance of its shard
(transformers issue #48690). ``super().compute_loss(...) + reg.loss()`` escapes the ``W`` but not
the accumulation: the balance counts once per micro-batch, ``k`` times its weight. Without loss
kwargs (or without ``average_tokens_across_devices``) there is no ``W`` and ``training_step``
divides every loss by ``k``. The mixin adds ``reg.loss()`` after the Trainer's own scaling, times
``1/k`` exactly when ``training_step`` will not divide by ``k`` (``loss_is_scaled_for_ga``, or the
Trainer's rule where that is ``None``; ``k``: ``current_gradient_accumulation_steps``, fewer in an
epoch's last step). As actreg's surrogate gives each micro-batch's global gradient after DDP's mean,
the balance's accumulated gradient is ``(1/k) sum_m grad R_m`` over the step's micro-batches ``m``,
``R_m`` the penalty of micro-batch ``m``'s global batch (every rank's shard of it).

*Semantics under accumulation* (``docs/accumulation.md``). With ``hf.load_balance(config)``
(``counts="batch"``), ``R_m`` is Mixtral's balance of global micro-batch ``m`` (recipe 1, per
micro-batch). With ``hf.load_balance(config, counts="window")`` it is the window buffer (recipe 3:
``f`` from the counts of micro-batches ``1..m`` of the step, every rank, ``P`` from micro-batch
``m``); a callback closes the window after every optimizer step (``reg.update_bias()``, which also
moves ``ExpertBias``'s biases). The exact window (recipe 2) needs every micro-batch's graph until
the last backward, which the Trainer does not keep.

Tested in ``tests/test_hf_trainer.py``: 2 gloo ranks, ``Trainer.train()`` with
``average_tokens_across_devices=True`` and ``gradient_accumulation_steps=2``, uneven padding,
optimizer steps of 2, 2 and 1 micro-batches; the parameters equal those of one float64 process
that replays each semantics' formula next to the Trainer's LM loss (also without loss kwargs), and
the naive sum and Mixtral's own term equal their own formulas, not the global balance. DDP only:
``DataParallel`` (``n_gpu > 1``) is refused; DeepSpeed and FSDP are untested.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
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


def load_balance(config: Any, coef: float | None = None, *, counts: str = "batch") -> LoadBalance:
    """``LoadBalance`` at the scale of a Hugging Face MoE config's auxiliary loss.

    ``config``: the ``model.config`` of a model whose loss adds ``coef *
    load_balancing_loss_func(router_logits, E, k, attention_mask)`` (Mixtral, Qwen2-MoE, Qwen3-MoE,
    OLMoE, DBRX, JetMoe, Jamba, GPT-OSS, ... and the multimodal ones through their
    ``text_config``: the module docstring lists them); ``coef``: the coefficient, by default the
    config's (``router_aux_loss_coef``, JetMoe's ``aux_loss_coef``, DBRX's
    ``ffn_config.moe_loss_weight``). Observing every layer's router logits under one name then
    gives ``coef * load_balancing_loss_func(...)`` of the global batch. Raises ``TypeError`` for a
    config without these settings and for the families whose loss is another formula (Doge,
    Switch Transformers, NLLB-MoE). ``counts``: ``LoadBalance``'s ``counts`` (``"window"``: ``f``
    from the counts of the optimizer step's window, see ``docs/accumulation.md``).
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
    return LoadBalance(getattr(sub, experts), top_k, top_k * coef, counts=counts)


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


# --- Trainer -----------------------------------------------------------------------------------


def _own_coefficient(model: Any) -> tuple[str, float] | None:
    """Where ``model`` reads the coefficient of its own per-rank auxiliary loss, and its value.

    The ``...ForCausalLM`` classes copy it to an attribute at construction (``router_aux_loss_coef``,
    JetMoe's ``aux_loss_coef``); the multimodal ones without that attribute read
    ``config.text_config.router_aux_loss_coef`` in every forward."""
    for attr in ("router_aux_loss_coef", "aux_loss_coef"):
        value = getattr(model, attr, None)
        if isinstance(value, (int, float)):
            return attr, float(value)
    config = getattr(model, "config", None)
    if config is None:
        return None
    try:
        sub, _, _, coef_name = _moe_config(config)
    except TypeError:  # a family with another formula: its own term is not ours to judge
        return None
    value = getattr(sub, coef_name, None)
    if not isinstance(value, (int, float)):
        return None
    where = "config" if sub is config else "config.text_config"  # (the only nesting read there)
    return f"{where}.{coef_name}", float(value)


class RegularizedTrainerMixin:
    """Mixin for a ``transformers.Trainer`` (or a subclass: TRL's ``SFTTrainer``, ...): adds
    ``regularizer.loss()`` to the loss of every training micro-batch at the scale that makes its
    accumulated, DDP-averaged gradient ``1/k`` times the sum over the step's ``k`` micro-batches of
    each one's global-batch gradient; the module docstring explains the scaling.

    ``regularizer``: built on the plain model, on every rank (the process group is needed only at
    its first ``loss()``, by when the Trainer has set it up). ``router_logits``: the observed name
    under which every layer's router logits (``outputs.router_logits``, padding masked by the
    batch's ``attention_mask``) are recorded; the model is called with
    ``output_router_logits=True``, and its own per-rank term must be off (coefficient 0, a
    ``ValueError`` otherwise). ``None``: nothing is observed here (penalties on hooked modules, or
    your own ``reg.observe`` calls in a ``compute_loss`` of yours that calls ``super()``). When the
    regularizer has a ``LoadBalance(counts="window")`` or an ``ExpertBias``, a callback calls
    ``regularizer.update_bias()`` after every optimizer step.
    """

    regularizer: ActivityRegularizer
    router_logits: str | None

    def __init__(
        self,
        *args: Any,
        regularizer: ActivityRegularizer,
        router_logits: str | None = "router",
        **kwargs: Any,
    ) -> None:
        if not isinstance(regularizer, ActivityRegularizer):
            raise TypeError(
                f"{type(self).__name__}(regularizer=...): expected an actreg.ActivityRegularizer, "
                f"got {type(regularizer).__name__}"
            )
        super().__init__(*args, **kwargs)
        trainer: Any = self
        if not hasattr(trainer, "loss_is_scaled_for_ga") or not hasattr(trainer, "model_accepts_loss_kwargs"):
            raise TypeError(
                f"{type(self).__name__}: this Trainer has no loss_is_scaled_for_ga or "
                "model_accepts_loss_kwargs, from which the mixin reads how training_step scales the "
                "loss (transformers 5); upgrade transformers, or add reg.loss() yourself at the "
                "scale your version applies"
            )
        self.regularizer = regularizer
        self.router_logits = router_logits
        self._coefficient_checked = False
        if (regularizer.biases or regularizer.window) and regularizer.biases.attached is None:
            trainer.add_callback(_window_closer(regularizer))

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        training = bool(model.training) and torch.is_grad_enabled()
        mask = inputs.get("attention_mask")
        if training and self.router_logits is not None:
            self._check_own_coefficient()
            inputs = {**inputs, "output_router_logits": True}
        loss, outputs = cast(Any, super()).compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        if training:
            if self.router_logits is not None:
                logits = getattr(outputs, "router_logits", None)
                if logits is None and isinstance(outputs, dict):
                    logits = outputs.get("router_logits")
                if logits is None:
                    raise ValueError(
                        f"{type(self).__name__}: the model returned no router_logits with "
                        "output_router_logits=True; pass router_logits=None and observe what to "
                        "regularize yourself"
                    )
                observe_router_logits(self.regularizer, logits, mask, self.router_logits)
            loss = loss + self.regularizer.loss() * self._regularizer_scale(num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _regularizer_scale(self, num_items_in_batch: Any) -> float:
        """The factor of ``reg.loss()`` in the value ``compute_loss`` returns (after the Trainer's
        own scaling, e.g. the world size under ``average_tokens_across_devices``, which applies to
        what ``super().compute_loss`` returned only): ``1/k`` if ``training_step`` takes the loss as
        already scaled for gradient accumulation, else ``1`` (it divides by ``k`` itself)."""
        trainer: Any = self
        if trainer.args.n_gpu > 1:
            raise RuntimeError(
                f"{type(self).__name__}: Trainer runs torch.nn.DataParallel here (n_gpu > 1), whose "
                "replicas' forwards an ActivityRegularizer cannot record; launch one process per "
                "device (torchrun, accelerate launch) instead"
            )
        scaled = trainer.loss_is_scaled_for_ga
        if scaled is None:  # the Trainer's own rule (transformers 5, Trainer.training_step)
            scaled = (
                trainer.model_accepts_loss_kwargs and num_items_in_batch is not None
            ) or trainer.compute_loss_func is not None
        k = getattr(trainer, "current_gradient_accumulation_steps", None)
        k = k or trainer.args.gradient_accumulation_steps  # (set by the training loop, per step)
        return 1.0 / k if scaled else 1.0

    def _check_own_coefficient(self) -> None:
        if self._coefficient_checked:
            return
        trainer: Any = self
        own = _own_coefficient(trainer.accelerator.unwrap_model(trainer.model))
        if own is not None and own[1] != 0:
            raise ValueError(
                f"{type(self).__name__}: the model adds its own per-rank balance ({own[0]} = {own[1]}) "
                "to its loss, which the Trainer scales by the world size; set it to 0.0 after building "
                "the regularizer's hf.load_balance(model.config) (actreg's global balance replaces it), "
                "or pass router_logits=None"
            )
        self._coefficient_checked = True


def _window_closer(regularizer: ActivityRegularizer) -> Any:
    """A ``TrainerCallback`` that closes the regularizer's windows after every optimizer step."""
    # (ignored where transformers is absent: mypy then sees neither the module nor the class)
    from transformers import TrainerCallback  # type: ignore[import-not-found, unused-ignore]

    class CloseWindows(TrainerCallback):  # type: ignore[misc, unused-ignore]
        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            regularizer.update_bias()

    return CloseWindows()


def __getattr__(name: str) -> Any:
    """``RegularizedTrainer``: ``RegularizedTrainerMixin`` on ``transformers.Trainer``, built at the
    first access (``import actreg.integrations.hf`` does not import ``transformers``)."""
    if name == "RegularizedTrainer":
        from transformers import Trainer  # type: ignore[import-not-found, unused-ignore]

        cls = type(
            "RegularizedTrainer",
            (RegularizedTrainerMixin, Trainer),
            {"__module__": __name__, "__doc__": "``transformers.Trainer`` with ``RegularizedTrainerMixin``."},
        )
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
