"""Hugging Face Mixtral (``actreg.integrations.hf``) on 2 gloo ranks with uneven shards.

actreg's ``LoadBalance`` of all layers' router logits (one observed name, weight ``k * coef``)
equals, in value and DDP-averaged gradient, ``coef * load_balancing_loss_func`` of the
concatenated batch in one float64 process; Mixtral's own per-rank auxiliary loss does not.
Skipped without the ``hf`` extra.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

if importlib.util.find_spec("transformers") is None:  # (importing it here would cost seconds)
    pytest.skip('needs the hf extra: pip install -e ".[hf]"', allow_module_level=True)

import dist_cases_hf as cases


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_global_balance_equals_mixtral_on_the_concatenated_batch(pools) -> None:
    ranks = pools[2].run(cases.balance, 5, 7, timeout=300)
    assert [r["rows"] for r in ranks] == [3, 2]  # uneven shards
    ref, ref_grad = ranks[0]["reference"], ranks[0]["reference_grad"]
    for r in ranks:
        assert r["actreg"] == pytest.approx(ref, rel=1e-5)
        assert relative(r["actreg_grad"], ref_grad) < 1e-4
    # Mixtral's own term: each rank balances its shard, DDP averages the two
    own = (ranks[0]["own"] + ranks[1]["own"]) / 2
    assert ranks[0]["own"] != pytest.approx(ranks[1]["own"], rel=1e-5)
    assert own != pytest.approx(ref, rel=1e-5)
    assert relative(ranks[0]["own_grad"], ref_grad) > 0.05  # measured: 0.4 on such batches


def test_example_runs(pools) -> None:
    ranks = pools[2].run(cases.run_example, ["--steps", "3"], timeout=300)
    # one global balance, identical on every rank; each rank's own balance is of its shard
    assert ranks[0]["global_balance"] == ranks[1]["global_balance"]
    assert all(np.isfinite(ranks[0]["global_balance"]))
    assert ranks[0]["rank_balance"] != ranks[1]["rank_balance"]


@pytest.mark.parametrize("family", sorted(cases.FAMILIES))
def test_every_family_balances_the_global_batch(pools, family: str) -> None:
    """``hf.load_balance(model.config)`` on each transformers family that computes
    ``load_balancing_loss_func``: actreg's value on 2 ranks (3 + 2 padded sequences) equals the
    float64 formula on the concatenated batch, and so the model's own auxiliary loss there (float32
    inside transformers) and what the model adds to its loss (float32 cross-entropy around it)."""
    ranks = pools[2].run(cases.family_balance, family, timeout=300)
    ref = ranks[0]["reference"]
    assert [r["rows"] for r in ranks] == [3, 2]
    assert ranks[0]["layers"] == cases.FAMILIES[family][3]  # the layers this family pools
    for r in ranks:
        assert r["actreg"] == pytest.approx(ref, rel=1e-6)  # some families route in float32
    assert ranks[0]["own"] == pytest.approx(ref, rel=1e-5)
    assert ranks[0]["added"] == pytest.approx(ref, rel=1e-4)


def test_qwen2_moe_ddp_gradient_equals_float64(pools) -> None:
    """Qwen2-MoE (``num_experts``, a shared expert, a router every second layer): the DDP-averaged
    gradient of actreg's balance equals the float64 gradient on the concatenated batch."""
    ranks = pools[2].run(cases.family_balance, "qwen2_moe", True, timeout=300)
    ref_grad = ranks[0]["reference_grad"]
    assert np.linalg.norm(ref_grad) > 0
    for r in ranks:
        assert r["actreg"] == pytest.approx(ranks[0]["reference"], rel=1e-12)
        assert relative(r["actreg_grad"], ref_grad) < 1e-10


def test_ernie_vl_pools_text_and_vision_experts(pools) -> None:
    """Ernie 4.5 VL MoE (``Ernie4_5_VLMoeForConditionalGeneration``): its text and vision experts
    have a gate each, whose logits fill one ``[batch * seq, E]`` tensor a layer by token type
    (``moe_mm_token_type_ids``), and ``load_balancing_loss_func`` pools them. With text and vision
    tokens on both ranks, actreg's value equals the float64 formula on the concatenated batch and
    the model's own aux loss there, and its DDP gradient reaches both gates as float64's does (the
    router computes its logits in float32, hence the tolerances)."""
    ranks = pools[2].run(cases.family_balance, "ernie4_5_vl_moe", True, True, timeout=300)
    ref, ref_grad = ranks[0]["reference"], ranks[0]["reference_grad"]
    norms = ranks[0]["gate_grad_norms"]
    assert sorted(norms) == ["model.language_model.layers.1.mlp.text_moe.gate.weight",
                             "model.language_model.layers.1.mlp.vision_moe.gate.weight"]
    assert all(v > 0 for v in norms.values())  # both experts' gates are balanced
    assert ranks[0]["own"] == pytest.approx(ref, rel=1e-5)
    for r in ranks:
        assert r["actreg"] == pytest.approx(ref, rel=1e-6)
        assert relative(r["actreg_grad"], ref_grad) < 1e-5


@pytest.mark.parametrize("model_type", ["doge", "switch_transformers", "nllb_moe"])
def test_families_with_another_loss_are_refused(model_type: str) -> None:
    """Doge (product keys), Switch Transformers and NLLB-MoE (a mean of per-sequence balances) have
    the settings' names but not the formula: a ``TypeError`` that says so, not a wrong penalty."""
    from types import SimpleNamespace

    from actreg.integrations import hf

    config = SimpleNamespace(
        model_type=model_type, num_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.01
    )
    with pytest.raises(TypeError, match="not the pooled balance"):
        hf.load_balance(config)
