"""``actreg moe --quick`` end to end on 2 gloo ranks, its figures recomputed independently.

The run logs raw numbers only (held-out NLL sums and byte counts, per-micro-batch expert loads
counted by the model, held-out domain x expert tables, the domain of every micro-batch); every
figure of ``moe.json`` is recomputed here with numpy from those -- perplexity from the logged losses,
MaxVio from the logged loads, mutual information and top-2 shares from the logged tables, mean ± std
over the seeds -- and the logs are checked for what the comparison relies on: every variant of a
seed starts from the same weights on the same micro-batch, each optimizer step's micro-batches cover
the domains, every token is routed to exactly k experts, and the MaxVio that actreg's own
``metrics()`` reports for the ExpertBias routers equals the one from the model's counts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("sklearn")  # the demo extra (its "numbers" domain; scipy comes with it)
pytest.importorskip("matplotlib")

from actreg.cli import main
from actreg.demo.moe_config import QUICK, VARIANTS, MoEConfig
from actreg.demo.moe_data import DEFAULT_DOMAINS
from actreg.demo.moe_metrics import mutual_information, top2_share

SEEDS = QUICK["seeds"]
D = len(DEFAULT_DOMAINS)
CFG = MoEConfig()  # the settings --quick leaves alone
K, E, W = CFG.top_k, CFG.experts, 2


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("moe")
    assert main(["moe", "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "moe.json").read_text())


def _runs(payload: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(r["variant"], r["seed"]): r for r in payload["runs"]}


def _maxvio(load: np.ndarray) -> np.ndarray:
    """max_e load / mean_e load - 1 over the last axis, written out."""
    return load.max(-1) / load.mean(-1) - 1


def _mi_bits(table: np.ndarray) -> float:
    p = table / table.sum()
    pd, pe = p.sum(1), p.sum(0)
    rows, cols = np.nonzero(p)
    return float(sum(p[d, e] * math.log2(p[d, e] / (pd[d] * pe[e])) for d, e in zip(rows, cols, strict=True)))


def test_outputs_and_every_run(quick: tuple[Path, dict[str, Any]]) -> None:
    out, payload = quick
    for name in ("moe.md", "moe.json"):
        assert (out / name).stat().st_size > 0
    for name in ("moe_heatmap.png", "moe_curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert payload["world_size"] == W
    assert sorted(_runs(payload)) == sorted((v, s) for v in VARIANTS for s in SEEDS)
    assert [d["name"] for d in payload["domains"]] == list(DEFAULT_DOMAINS)
    for d in payload["domains"]:
        assert d["tokens"] == d["train_tokens"] + d["held_out_tokens"] > 0
    table = (out / "moe.md").read_text()
    for v in VARIANTS:
        assert f"| `{v}` |" in table


def test_perplexity_from_the_logged_losses(quick: tuple[Path, dict[str, Any]]) -> None:
    _, payload = quick
    per_domain = QUICK["eval_windows"] * QUICK["context"]  # predicted bytes per domain
    for r in payload["runs"]:
        nll = np.array(r["eval"]["nll_sum"])
        tokens = np.array(r["eval"]["tokens"])
        assert tokens.tolist() == [per_domain] * D
        for name, s, n in zip(DEFAULT_DOMAINS, nll, tokens, strict=True):
            assert r["figures"][f"ppl/{name}"] == pytest.approx(np.exp(s / n), rel=1e-12)
            assert 1 < np.exp(s / n) < 256  # a byte model that learned something
        assert r["figures"]["ppl/overall"] == pytest.approx(np.exp(nll.sum() / tokens.sum()), rel=1e-12)
        steps = len(r["loss"])
        assert r["train_tokens"] == steps * W * QUICK["micro_batch"] * QUICK["context"] * CFG.accumulation
        assert r["figures"]["tokens_per_s"] == pytest.approx(r["train_tokens"] / r["train_seconds"])


def test_max_violation_from_the_logged_counts(quick: tuple[Path, dict[str, Any]]) -> None:
    _, payload = quick
    tokens = QUICK["micro_batch"] * QUICK["context"]
    for r in payload["runs"]:
        load = np.array(r["load"], dtype=np.float64)  # [steps, micro, ranks, layers, E]
        assert load.shape == (QUICK["steps"], CFG.accumulation, W, CFG.layers, E)
        assert (load.sum(-1) == tokens * K).all()  # every token to exactly k experts
        tail = load[QUICK["steps"] // 2 :]
        assert r["figures"]["maxvio_global"] == pytest.approx(_maxvio(tail.sum((1, 2))).mean(), rel=1e-12)
        assert r["figures"]["maxvio_micro"] == pytest.approx(_maxvio(tail).mean(), rel=1e-12)
        if r["variant"].startswith("bias"):  # actreg's metrics() vs the model's own counts
            last = load[-1, -1].sum(0)  # the last loss(): both ranks' last micro-batch, [layers, E]
            library = r["library_max_violation"]
            assert list(library) == [f"blocks.{i}.moe.router" for i in range(CFG.layers)]
            assert list(library.values()) == pytest.approx(_maxvio(last).tolist(), rel=1e-6)


def test_specialisation_from_the_logged_tables(quick: tuple[Path, dict[str, Any]]) -> None:
    _, payload = quick
    per_domain = QUICK["eval_windows"] * QUICK["context"] * K
    for r in payload["runs"]:
        counts = np.array(r["eval"]["counts"], dtype=np.float64)  # [layers, domains, E]
        assert (counts.sum(-1) == per_domain).all()
        mi = np.mean([_mi_bits(c) for c in counts])
        assert r["figures"]["mi_bits"] == pytest.approx(mi, rel=1e-9, abs=1e-12)
        assert 0 <= mi <= math.log2(D) + 1e-12
        top2 = np.sort(counts, -1)[..., -2:].sum(-1) / counts.sum(-1)
        assert r["figures"]["top2_share"] == pytest.approx(top2.mean(), rel=1e-12)


def test_summary_is_mean_and_std_over_seeds(quick: tuple[Path, dict[str, Any]]) -> None:
    _, payload = quick
    runs = _runs(payload)
    for v in VARIANTS:
        for key, (mean, std) in payload["summary"][v].items():
            values = np.array([runs[(v, s)]["figures"][key] for s in SEEDS])
            assert mean == pytest.approx(values.mean(), rel=1e-12)
            assert std == pytest.approx(values.std(ddof=1), rel=1e-9, abs=1e-12)


def test_same_start_same_data_and_each_variants_loss(quick: tuple[Path, dict[str, Any]]) -> None:
    _, payload = quick
    runs = _runs(payload)
    for s in SEEDS:
        first = {v: runs[(v, s)]["loss"][0][0] for v in VARIANTS}  # same weights, same micro-batch
        for v in VARIANTS:
            assert first[v] == pytest.approx(first["none"], rel=1e-6)
            assert runs[(v, s)]["domain"] == runs[("none", s)]["domain"]
        for step in runs[("none", s)]["domain"]:  # 2 micro-batches x 2 ranks = one of each domain
            assert sorted(d for micro in step for d in micro) == list(range(D))
    for r in payload["runs"]:
        bal = np.array(r["balance"])  # [steps, micro, ranks]: what reg.loss() returned
        if r["variant"] in ("none", "bias"):
            assert (bal == 0).all()
        elif r["variant"] == "micro":  # each rank's own micro-batch: the ranks differ
            assert (bal > 0).all() and not np.allclose(bal[..., 0], bal[..., 1])
        else:  # a global value: the same on both ranks
            assert (bal > 0).all() and np.allclose(bal[..., 0], bal[..., 1], rtol=1e-6)


def test_metric_functions_on_known_tables() -> None:
    import torch

    diagonal = torch.eye(4) * 10
    assert mutual_information(diagonal) == pytest.approx(2.0)
    assert mutual_information(torch.ones(4, 8)) == pytest.approx(0.0, abs=1e-12)
    assert top2_share(torch.ones(3, 8)).tolist() == pytest.approx([0.25] * 3)
    assert top2_share(torch.tensor([[5.0, 3.0, 2.0, 0.0]])).tolist() == pytest.approx([0.8])


def test_paired_test_is_scipys_paired_t_test() -> None:
    from scipy import stats

    from actreg.demo.moe_report import paired_test

    a = np.array([9.87, 9.22, 10.12, 9.46, 9.39])
    b = np.array([9.56, 9.24, 9.69, 9.53, 9.50])
    diffs = (100 * (b / a - 1)).tolist()
    se, t, p = paired_test(diffs)
    ref = stats.ttest_rel(100 * b / a, np.full(5, 100.0))
    assert t == pytest.approx(ref.statistic, rel=1e-9)
    assert p == pytest.approx(ref.pvalue, rel=1e-9)
    assert se == pytest.approx(np.std(diffs, ddof=1) / np.sqrt(5), rel=1e-12)


def test_seed_ranges() -> None:
    from actreg.demo.moe_config import _ints

    assert _ints("0-3,7") == [0, 1, 2, 3, 7]
    assert _ints("5") == [5]


def test_bad_options_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["moe", "--variants", "none,nope"]) == 2
    assert "unknown variant 'nope'" in capsys.readouterr().err
    assert main(["moe", "--domains", "english"]) == 2
    assert main(["moe", "--top-k", "9"]) == 2
    assert main(["moe", "--seeds", "1,1"]) == 2
