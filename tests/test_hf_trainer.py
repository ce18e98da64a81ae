"""``hf.RegularizedTrainer``: actreg's global-batch ``LoadBalance`` through ``Trainer.train()``.

2 gloo ranks, ``TrainingArguments(average_tokens_across_devices=True, gradient_accumulation_steps=2)``,
a tiny random Mixtral in float64, 20 right-padded sequences: optimizer steps of 2, 2 and 1
micro-batches of 2 sequences per rank, SGD. The parameters after training equal those of one float64
process that replays the steps from the published formulas (``dist_cases_hf_trainer.reference``):
the Trainer's token-averaged LM loss plus ``1/k`` times the sum over the step's micro-batches of
Mixtral's balance of each global micro-batch (or of the window-count balance). The two ways a user
would add a balance without the recipe are measured too: ``super().compute_loss(...) + reg.loss()``
is ``k`` times too strong, and Mixtral's own auxiliary loss is each rank's balance, summed over the
ranks and micro-batches (the Trainer multiplies it by the world size; transformers issue #48690).
Skipped without ``transformers`` and ``accelerate`` (which ``Trainer`` needs).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import pytest

if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("accelerate") is None:
    pytest.skip(
        'needs transformers and accelerate: pip install -e ".[hf]" accelerate', allow_module_level=True
    )

import dist_cases_hf_trainer as cases

# The Trainer's LM loss is computed on float32 logits (transformers' ForCausalLMLoss upcasts with
# .float(), which rounds the float64 logits): parameters agree to float32 rounding (measured: 1e-7).
EXACT = 1e-6
# what is wrong differs by far more (measured: 0.3 to 1.0 on the router)
WRONG = 0.05


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _train(pools: Any, variant: str, references: list[str], counts: str = "batch",
           loss_kwargs: bool = True) -> dict[str, Any]:
    ranks = pools[2].run(cases.train, variant, references, counts, loss_kwargs, timeout=300)
    first = ranks[0]
    # what the Trainer did: 5 micro-batches a rank, steps after 2, 4 and 5 of them, uneven padding
    assert [r["micro_batches"] for r in ranks] == [5, 5]
    assert first["boundaries"] == [2, 4, 5]
    assert first["tokens"] != ranks[1]["tokens"]
    if loss_kwargs:  # num_items_in_batch: the real labels of the whole step, every rank
        assert first["items"][0::2] == first["reference_items"]
    else:
        assert np.isnan(first["items"]).all()
    for key in ("params", "router"):  # DDP kept the replicas equal
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key])
    return first


def error(run: dict[str, Any], balance: str, key: str = "params") -> float:
    """Relative distance of the Trainer's update over training from the reference's."""
    start = run["initial"][key]
    return relative(run[key] - start, run["reference"][balance][key] - start)


def test_trainer_balance_per_micro_batch_equals_float64(pools: Any) -> None:
    """The recipe with ``LoadBalance`` (``counts="batch"``): each micro-batch's global balance,
    ``1/k`` of it per micro-batch, next to the Trainer's token-averaged LM loss."""
    run = _train(pools, "actreg", ["global-batch"])
    assert error(run, "global-batch") < EXACT
    assert error(run, "global-batch", "router") < EXACT


def test_trainer_window_counts_equals_float64(pools: Any) -> None:
    """The recipe with ``LoadBalance(counts="window")``: ``f`` from the counts of the step's
    micro-batches so far, every rank; the callback closes the window after each optimizer step."""
    run = _train(pools, "actreg", ["global-window", "global-batch"], counts="window")
    assert error(run, "global-window") < EXACT
    assert error(run, "global-window", "router") < EXACT
    assert error(run, "global-batch", "router") > WRONG  # the two semantics differ measurably


def test_trainer_without_loss_kwargs_equals_float64(pools: Any) -> None:
    """A model without loss kwargs (``accepts_loss_kwargs = False``, as Ernie 4.5 VL): the Trainer
    neither multiplies by the world size nor counts tokens, and divides every loss by ``k`` itself;
    the recipe's balance is still ``1/k`` of each micro-batch's global balance."""
    run = _train(pools, "actreg", ["global-batch"], loss_kwargs=False)
    assert error(run, "global-batch") < EXACT
    assert error(run, "global-batch", "router") < EXACT


def test_naive_compute_loss_is_k_times_too_strong(pools: Any) -> None:
    """``super().compute_loss(...) + reg.loss()`` in a ``compute_loss`` override: the Trainer takes
    the loss as already scaled for accumulation, so the balance counts once per micro-batch, ``k``
    times its weight -- exactly the reference without the ``1/k``."""
    run = _train(pools, "naive", ["global-sum", "global-batch"])
    assert error(run, "global-sum") < EXACT
    assert error(run, "global-batch", "router") > WRONG


def test_models_own_aux_loss_is_each_ranks_balance_summed(pools: Any) -> None:
    """Mixtral's own ``router_aux_loss_coef * aux_loss`` (``output_router_logits=True``), inside the
    model's loss: the Trainer multiplies it by the world size, DDP averages, nothing divides by
    ``k`` -- the sum over ranks and micro-batches of each rank's balance of its shard."""
    run = _train(pools, "own", ["rank-sum", "global-batch"])
    assert error(run, "rank-sum") < EXACT
    assert error(run, "global-batch", "router") > WRONG


def test_own_balance_left_on_is_refused(pools: Any) -> None:
    """A model whose own per-rank term is still on would add it to actreg's: a ``ValueError`` that
    says which coefficient to zero, on every rank, at the first micro-batch."""
    messages = pools[2].run(cases.refused, timeout=300)
    for message in messages:
        assert "router_aux_loss_coef = 0.1" in message
        assert "set it to 0.0" in message
