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
