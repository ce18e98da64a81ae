"""PyTorch Lightning (``actreg.integrations.lightning``): examples/lightning_ddp.py on 2 gloo ranks.

The example's ``main`` runs on the pool's ranks as under ``torchrun`` (``Trainer(accelerator="cpu",
devices=2, strategy="ddp")``). Checked: the parameter update of a step is that of one float64
process on the global batch with the penalties in the loss, the logged ``actreg/...`` metrics are
the global penalties, every checkpoint holds the regularizer state, and a run resumed from a
checkpoint ends with the same EMA and parameters as the run that did not stop. Skipped without the
``lightning`` extra.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

if importlib.util.find_spec("lightning") is None:  # (importing it here would cost seconds)
    pytest.skip('needs the lightning extra: pip install -e ".[lightning]"', allow_module_level=True)

import dist_cases_lightning as cases

LR = 0.1  # the example's default learning rate


def reference(params: list[np.ndarray], x: np.ndarray, y: np.ndarray, penalties: bool) -> dict:
    """One SGD step of the example's MLP on the whole batch in float64, penalties from their formulas."""
    w1, b1, w2, b2, w3, b3 = (torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in params)
    xs = torch.tensor(x, dtype=torch.float64)
    h1 = torch.relu(xs @ w1.T + b1)  # body.1
    h2 = torch.tanh(h1 @ w2.T + b2)  # body.3
    loss = F.cross_entropy(h2 @ w3.T + b3, torch.tensor(y))
    l1 = 1e-2 * h1.abs().sum() / h1.shape[0]  # L1(1e-2): weight * sum|x| / positions
    var = ((h2 - h2.mean(0)) ** 2).sum(0) / (h2.shape[0] - 1)  # unbiased
    floor = 0.1 * torch.relu(0.5 - torch.sqrt(var + 1e-4)).mean()  # VarianceFloor(0.1, gamma=0.5)
    if penalties:
        loss = loss + l1 + floor
    grads = torch.autograd.grad(loss, [w1, b1, w2, b2, w3, b3])
    new = [(p - LR * g).detach().numpy() for p, g in zip((w1, b1, w2, b2, w3, b3), grads, strict=True)]
    return {"params": new, "L1": l1.item(), "VarianceFloor": floor.item()}


def logged(out: Path) -> list[dict[str, str]]:
    (metrics,) = out.glob("lightning_logs/version_*/metrics.csv")
    with metrics.open() as f:
        return list(csv.DictReader(f))


def test_step_equals_one_process_on_the_global_batch(pools, tmp_path: Path) -> None:
    """sync="global", one step of 2 x 8 samples: update and logged penalties vs float64 on all 16."""
    start = pools[2].run(cases.initial, "global", 16)[0]
    out = tmp_path / "global"
    argv = ["--out", str(out), "--epochs", "1", "--samples", "16", "--batch-size", "8", "--sync", "global"]
    ranks = pools[2].run(cases.fit, argv, timeout=300)
    ref = reference(start["params"], start["x"], start["y"], penalties=True)
    plain = reference(start["params"], start["x"], start["y"], penalties=False)
    want, without = (np.concatenate([p.ravel() for p in ps]) for ps in (ref["params"], plain["params"]))
    for r in ranks:
        got = np.concatenate([p.ravel() for p in r["params"]])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        assert not np.allclose(got, without, rtol=1e-5, atol=1e-7)  # the penalties are in the update
    (row,) = logged(out)
    assert float(row["actreg/body.1/L1"]) == pytest.approx(ref["L1"], rel=1e-5)
    assert float(row["actreg/body.3/VarianceFloor"]) == pytest.approx(ref["VarianceFloor"], rel=1e-5)
    assert float(row["actreg/total"]) == pytest.approx(ref["L1"] + ref["VarianceFloor"], rel=1e-5)
    assert float(row["actreg/body.1/count"]) == 16.0  # the global batch, not a shard


def test_checkpoint_keeps_the_ema_and_resume_continues_it(pools, tmp_path: Path) -> None:
    """sync="ema": 2 epochs straight vs stopped after epoch 0 and resumed from its checkpoint."""
    common = ["--epochs", "2", "--samples", "32", "--batch-size", "8"]
    a, b = tmp_path / "a", tmp_path / "b"
    straight = pools[2].run(cases.fit, ["--out", str(a), *common], timeout=300)
    first = a / "checkpoints" / "epoch=0.ckpt"
    resumed = pools[2].run(cases.fit, ["--out", str(b), *common, "--resume", str(first)], timeout=300)

    saved = torch.load(a / "checkpoints" / "epoch=1.ckpt", weights_only=False)["actreg"]
    assert saved["sync"] == "ema" and saved["step"] == 4
    assert torch.load(first, weights_only=False)["actreg"]["step"] == 2
    for r in range(2):
        for s, want in ((straight[r], straight[0]), (resumed[r], straight[0])):
            assert s["state"]["step"] == 4
            for slot, per_penalty in want["state"]["ema"].items():
                for label, stats in per_penalty.items():
                    for key, value in stats.items():
                        np.testing.assert_allclose(s["state"]["ema"][slot][label][key], value, rtol=1e-6)
                        np.testing.assert_allclose(saved["ema"][slot][label][key].numpy(), value, rtol=1e-6)
            for got, ref in zip(s["params"], want["params"], strict=True):
                np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-8)
            # a pickled copy (ddp_spawn, deepcopy) carries the state and rebuilds the hooks in setup
            assert not s["copy_built_before_setup"]
            assert s["copy_state"]["step"] == 4
            np.testing.assert_allclose(s["copy_state"]["ema"]["body.1"]["L1"]["abs_sum"],
                                       s["state"]["ema"]["body.1"]["L1"]["abs_sum"])
    rows = logged(a)
    assert [int(r["step"]) for r in rows if r.get("actreg/total")] == [0, 1, 2, 3]  # every step logged


def test_training_step_without_the_penalty_raises(pools, tmp_path: Path) -> None:
    errors = pools[2].run(cases.fit_without_penalty, str(tmp_path), timeout=300, expect_errors=True)
    for rank, err in enumerate(errors):
        assert err is not None and err.type_name == "RuntimeError", err
        assert f"rank {rank}: training_step of batch 0 did not call self.actreg_loss()" in err.message
