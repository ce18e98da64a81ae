"""Rank functions for tests/test_hf_trainer.py: ``Trainer.train()`` of a tiny random Mixtral on the
pool's 2 gloo ranks, and its float64 reference in one process.

Each rank function trains the same model (seed 0, float64) on the same 20 right-padded sequences of
8 tokens with ``TrainingArguments(average_tokens_across_devices=True, gradient_accumulation_steps=2,
per_device_train_batch_size=2)``: 5 micro-batches per rank, so optimizer steps of 2, 2 and 1
micro-batches. It records what the Trainer handed ``compute_loss`` (inputs, ``num_items_in_batch``)
and after which micro-batch the optimizer stepped, gathers that on rank 0, and rank 0 replays the
steps in one float64 process from the published formulas (:func:`reference`), independently of
actreg's code. ``transformers`` is imported only inside the functions (the test process never
imports it).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import AbstractContextManager
from typing import Any
from unittest import mock

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import actreg
from actreg.integrations import hf

LENGTH = 8  # tokens per sequence, right-padded
SEQUENCES = 20  # 10 per rank: micro-batches of 2, optimizer steps of 2, 2 and 1 micro-batches
BATCH = 2  # per_device_train_batch_size
ACCUMULATION = 2  # gradient_accumulation_steps
EXPERTS, TOP_K, COEF = 4, 2, 0.1
LR = 0.5
VOCAB = 32


def tiny_model() -> Any:
    """One Mixtral layer, hidden 16, 4 experts top-2, coefficient 0.1, float64 (seed 0)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K, router_aux_loss_coef=COEF, max_position_embeddings=16,
        use_cache=False, pad_token_id=0, experts_implementation="eager",
    )
    torch.manual_seed(0)
    return MixtralForCausalLM(config).double()


def dataset() -> list[dict[str, torch.Tensor]]:
    """``SEQUENCES`` sequences of 2..8 real tokens (ids 3..31), right-padded with 0 to ``LENGTH``;
    labels are the ids with -100 on padding."""
    g = torch.Generator().manual_seed(11)
    lengths = torch.randint(2, LENGTH + 1, (SEQUENCES,), generator=g)
    rows = []
    for n in lengths.tolist():
        ids = torch.randint(3, VOCAB, (LENGTH,), generator=g)
        mask = (torch.arange(LENGTH) < n).long()
        rows.append({
            "input_ids": ids.masked_fill(mask == 0, 0),
            "attention_mask": mask,
            "labels": ids.masked_fill(mask == 0, -100),
        })
    return rows


def launched_as(rank: int, world_size: int) -> AbstractContextManager[Any]:
    """The environment ``torchrun`` gives a rank, for the block (the process group exists already,
    so accelerate takes it: ``MULTI_CPU`` on gloo)."""
    env = {
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
    }
    return mock.patch.dict(os.environ, env)


def _flat(model: torch.nn.Module) -> np.ndarray:
    return np.concatenate([p.detach().double().flatten().numpy() for p in model.parameters()])


def _router_flat(model: torch.nn.Module) -> np.ndarray:
    return np.concatenate(
        [p.detach().double().flatten().numpy() for n, p in model.named_parameters() if ".gate." in n]
    )


def train(
    rank: int, world_size: int, variant: str, references: list[str], counts: str = "batch",
    loss_kwargs: bool = True,
) -> dict[str, Any]:
    """``Trainer.train()`` on this rank; rank 0 adds the float64 :func:`reference` of each balance
    in ``references`` (``result["reference"][balance]``) and the initial parameters.

    ``variant``: ``"actreg"`` -- ``hf.RegularizedTrainer`` with ``hf.load_balance(config,
    counts=counts)`` (the recipe); ``"naive"`` -- a ``compute_loss`` override that returns
    ``super().compute_loss(...) + reg.loss()``; ``"own"`` -- the plain ``Trainer`` with Mixtral's own
    per-rank auxiliary loss (``output_router_logits=True``). ``loss_kwargs=False``: the model says it
    takes no loss kwargs (``accepts_loss_kwargs = False``, as Ernie 4.5 VL does), so the Trainer
    averages each micro-batch's loss on its own and divides by the accumulation steps."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = tiny_model()
    if not loss_kwargs:
        model.accepts_loss_kwargs = False
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[dict[str, np.ndarray]] = []
    items: list[float] = []
    boundaries: list[int] = []  # micro-batches seen when the optimizer stepped

    class Record:
        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            if model.training:
                seen.append({k: inputs[k].numpy().copy() for k in ("input_ids", "attention_mask", "labels")})
                items.append(float("nan") if num_items_in_batch is None else float(num_items_in_batch))
            return super().compute_loss(  # type: ignore[misc]
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )

    class Steps(TrainerCallback):
        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            boundaries.append(len(seen))

    kwargs: dict[str, Any] = {}
    if variant == "actreg":
        balance = hf.load_balance(model.config, counts=counts)
        model.router_aux_loss_coef = 0.0  # actreg's global balance replaces the per-rank term
        reg = actreg.ActivityRegularizer(model, {"router": balance}, observed=["router"])
        base: type = type("Recipe", (Record, hf.RegularizedTrainer), {})
        kwargs["regularizer"] = reg
    elif variant == "naive":
        balance = hf.load_balance(model.config)
        model.router_aux_loss_coef = 0.0
        reg = actreg.ActivityRegularizer(model, {"router": balance}, observed=["router"])

        class Naive(Record, Trainer):
            def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                             num_items_in_batch: Any = None) -> Any:
                loss, out = super().compute_loss(
                    model, {**inputs, "output_router_logits": True}, return_outputs=True,
                    num_items_in_batch=num_items_in_batch,
                )
                hf.observe_router_logits(reg, out.router_logits, inputs["attention_mask"])
                loss = loss + reg.loss()
                return (loss, out) if return_outputs else loss

        base = Naive
    elif variant == "own":
        model.config.output_router_logits = True
        base = type("Own", (Record, Trainer), {})
    else:
        raise ValueError(variant)

    with launched_as(rank, world_size), tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, use_cpu=True, report_to="none", disable_tqdm=True,
            per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUMULATION,
            average_tokens_across_devices=True, num_train_epochs=1, learning_rate=LR, optim="sgd",
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
            logging_strategy="no", save_strategy="no", eval_strategy="no",
            ddp_find_unused_parameters=True, dataloader_num_workers=0, seed=5,
        )
        trainer = base(model=model, args=args, train_dataset=dataset(), callbacks=[Steps()], **kwargs)
        trainer.train()
    result: dict[str, Any] = {
        "params": _flat(model), "router": _router_flat(model), "micro_batches": len(seen),
        "boundaries": boundaries, "items": items,
        "tokens": [int(s["attention_mask"].sum()) for s in seen],
    }
    everyone: list[Any] = [None] * world_size
    dist.all_gather_object(everyone, seen)
    if rank == 0:
        lm = "tokens" if loss_kwargs else "rank-mean"
        start = tiny_model()
        start.load_state_dict(initial)
        result["initial"] = {"params": _flat(start), "router": _router_flat(start)}
        result["reference"] = {}
        for balance in references:
            ref, result["reference_items"] = reference(initial, everyone, boundaries, balance, lm)
            result["reference"][balance] = {"params": _flat(ref), "router": _router_flat(ref)}
    return result


# --- the float64 reference ----------------------------------------------------------------------


def mixtral_balance(router_logits: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Mixtral's ``load_balancing_loss_func`` in float64, written out: ``E * sum_e f_e P_e`` with
    ``f_e`` the top-k assignments to expert ``e`` over the real tokens of every layer divided by
    their number (not by ``k``) and ``P_e`` the mean softmax probability there."""
    counts, probs, tokens = _balance_sums(router_logits, mask)
    return EXPERTS * (counts / tokens * probs / tokens).sum()


def _balance_sums(
    router_logits: list[torch.Tensor], mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Top-k counts and summed probabilities over the real tokens of every layer, and their number."""
    keep = mask.reshape(-1).bool()
    counts = torch.zeros(EXPERTS, dtype=torch.float64)
    probs = torch.zeros(EXPERTS, dtype=torch.float64)
    tokens = 0
    for logits in router_logits:
        p = torch.softmax(logits.double(), -1)[keep]
        counts = counts + torch.bincount(p.detach().topk(TOP_K, -1).indices.reshape(-1), minlength=EXPERTS)
        probs = probs + p.sum(0)
        tokens += int(keep.sum())
    return counts, probs, tokens


def reference(
    initial: dict[str, torch.Tensor], seen: list[list[dict[str, np.ndarray]]], boundaries: list[int],
    balance: str, lm: str = "tokens",
) -> tuple[torch.nn.Module, list[float]]:
    """Replay the optimizer steps in one float64 process on the concatenated global micro-batches;
    the trained model and each step's ``N_t``.

    Step ``t`` with micro-batches ``m = 1..k_t`` (rank 0's rows, then rank 1's) minimizes
    ``LM_t + B_t``. The LM loss as the Trainer defines it, with ``CE_sum(m, r)`` the summed
    next-token cross-entropy of the real labels of rank ``r``'s part of micro-batch ``m`` and
    ``n(m, r)`` their number:

    - ``tokens`` (``average_tokens_across_devices`` and a model that takes ``num_items_in_batch``):
      ``sum_m sum_r CE_sum(m, r) / N_t``, ``N_t = sum_m sum_r n(m, r)``, the whole step, every rank;
    - ``rank-mean`` (a model without loss kwargs): ``(1/k_t) sum_m (1/W) sum_r CE_sum(m, r) / n(m, r)``,
      each rank's mean, averaged by DDP and over the micro-batches.

    The balance term ``B_t``:

    - ``global-batch``: ``(1/k_t) sum_m coef * lbl(m)``, ``lbl`` Mixtral's balance of micro-batch
      ``m``'s global batch (the recipe with ``LoadBalance``, per micro-batch);
    - ``global-window``: ``(1/k_t) sum_m coef * E * sum_e (C_e(1..m) / T(1..m)) * (S_e(m) / T(m))``,
      ``C`` top-k counts and ``T`` real (token, layer) pairs of micro-batches ``1..m`` of the step,
      every rank, ``S`` the summed probabilities of micro-batch ``m`` (``counts="window"``,
      ``docs/accumulation.md`` section 3);
    - ``global-sum``: ``sum_m coef * lbl(m)`` (not divided by ``k_t``);
    - ``rank-sum``: ``sum_m sum_r coef * lbl(m, r)``, each rank's balance of its own shard, summed.

    Then SGD: ``p -= LR * grad``.
    """
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    model = tiny_model()
    model.load_state_dict(initial)
    world = len(seen)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    items: list[float] = []
    begin = 0
    for end in boundaries:
        micro = [
            {k: torch.from_numpy(np.concatenate([rank[m][k] for rank in seen])) for k in seen[0][m]}
            for m in range(begin, end)
        ]
        k = len(micro)
        n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        items.append(float(n))
        total = torch.zeros((), dtype=torch.float64)
        window_counts = torch.zeros(EXPERTS, dtype=torch.float64)
        window_tokens = 0
        for b in micro:
            out = model(
                input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_router_logits=True
            )
            ce = F.cross_entropy(
                out.logits[:, :-1].reshape(-1, VOCAB), b["labels"][:, 1:].reshape(-1), reduction="none"
            ).reshape(b["labels"].shape[0], -1)  # 0 where the label is -100
            if lm == "tokens":
                total = total + ce.sum() / n
            else:
                real = (b["labels"][:, 1:] != -100).sum(1)
                for ce_r, real_r in zip(ce.chunk(world), real.chunk(world), strict=True):
                    total = total + ce_r.sum() / real_r.sum() / world / k
            lbl = mixtral_balance(out.router_logits, b["attention_mask"])
            theirs = load_balancing_loss_func(out.router_logits, EXPERTS, TOP_K, b["attention_mask"])
            assert abs(float(theirs) - float(lbl)) <= 1e-5 * float(lbl), (float(theirs), float(lbl))
            if balance == "global-batch":
                total = total + COEF * lbl / k
            elif balance == "global-window":
                c, s, t = _balance_sums(out.router_logits, b["attention_mask"])
                window_counts, window_tokens = window_counts + c, window_tokens + t
                total = total + COEF * EXPERTS * (window_counts / window_tokens * s / t).sum() / k
            elif balance == "global-sum":
                total = total + COEF * lbl
            elif balance == "rank-sum":
                rows = b["input_ids"].shape[0] // world
                for r in range(world):
                    part = slice(r * rows, (r + 1) * rows)
                    shard = model(input_ids=b["input_ids"][part], attention_mask=b["attention_mask"][part],
                                  output_router_logits=True)
                    total = total + COEF * mixtral_balance(shard.router_logits, b["attention_mask"][part])
            else:
                raise ValueError(balance)
        opt.zero_grad()
        total.backward()
        opt.step()
        begin = end
    return model, items


def refused(rank: int, world_size: int) -> str:
    """``hf.RegularizedTrainer`` on a model whose own per-rank balance is still on: the message of
    the ``ValueError`` that ``train()`` raises at the first micro-batch, before any forward."""
    from transformers import TrainingArguments

    model = tiny_model()
    reg = actreg.ActivityRegularizer(model, {"router": hf.load_balance(model.config)}, observed=["router"])
    with launched_as(rank, world_size), tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, use_cpu=True, report_to="none", disable_tqdm=True,
            per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUMULATION,
            average_tokens_across_devices=True, max_steps=1, save_strategy="no",
            ddp_find_unused_parameters=True,
        )
        trainer = hf.RegularizedTrainer(model=model, args=args, train_dataset=dataset(), regularizer=reg)
        try:
            trainer.train()
        except ValueError as err:
            return str(err)
    return "trained"
