"""End-to-end tests of the ``actreg`` command at small size (W=2 gloo workers on CPU).

Each launch starts real worker processes through torch.distributed's elastic launcher (or
``python -m torch.distributed.run`` for the two-node test), so they are kept few and short.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from actreg.cli import main
from actreg.demo.report import finite, read_jsonl

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("rich")

SMALL = ["--nproc", "2", "--batch-size", "64", "--no-progress"]
STEPS_PER_EPOCH = 23  # ceil(1437 training digits / 64)
UNSTABLE = {"time_s"}  # wall-clock fields


def _epochs(path: Path) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(path / "metrics.jsonl") if r["type"] == "epoch"]


def _stable(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in UNSTABLE}


def _assert_close(a: Any, b: Any, tol: float = 1e-6, where: str = "") -> None:
    """Nested equality, numbers to ``tol`` relative."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_close(a[k], b[k], tol, f"{where}/{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_close(x, y, tol, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert b == pytest.approx(a, rel=tol, abs=1e-12), where
    else:
        assert a == b, where


def _png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, path


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-epoch run with plots (the reference of the resume and two-node tests)."""
    out = tmp_path_factory.mktemp("full")
    assert main(["train", *SMALL, "--epochs", "2", "--out", str(out)]) == 0
    return out


def test_train_outputs(full_run: Path) -> None:
    records = read_jsonl(full_run / "metrics.jsonl")
    assert all(finite(r) for r in records)
    steps = [r for r in records if r["type"] == "step"]
    epochs = [r for r in records if r["type"] == "epoch"]
    assert len(steps) == 2 * STEPS_PER_EPOCH and [e["epoch"] for e in epochs] == [1, 2]
    # Global batches split over 2 ranks: the last one (29 samples) unevenly, nothing duplicated.
    assert all(sum(s["shard_sizes"]) == s["samples"] for s in steps)
    assert steps[STEPS_PER_EPOCH - 1]["shard_sizes"] == [15, 14]
    assert sum(s["samples"] for s in steps[:STEPS_PER_EPOCH]) == 1437
    final = epochs[-1]
    assert final["world_size"] == 2 and final["sync"] == "global"
    assert final["test_acc"] > 0.8 and final["train_loss"] < epochs[0]["train_loss"]
    assert final["objective_error"] == 0.0  # global mode optimizes the global-batch penalty exactly
    assert 0.0 < final["rank_disagreement"] < 1.0  # ... which per-rank statistics do not give
    assert set(final["test_activity"]) == {"act1", "act2"}
    assert {"act1/L1", "act2/L1", "act2/DeCov", "act1/active_fraction"} <= set(final["disagreement"])

    ckpts = sorted((full_run / "checkpoints").glob("*.pt"))
    assert [p.name for p in ckpts] == ["epoch_001.pt", "epoch_002.pt"]
    state = torch.load(ckpts[-1], weights_only=True)
    assert state["epoch"] == 2 and state["config"]["sync"] == "global"
    assert {"fc1.weight", "head.bias"} <= set(state["model"]) and state["optimizer"]["state"]
    assert not list((full_run / "checkpoints").glob(".*"))  # no temporary files left

    report = (full_run / "report.md").read_text()
    assert "| epoch | train loss" in report and "torchrun --nproc-per-node 2 -m actreg.demo.train" in report
    for name in ("loss.png", "activity.png", "histograms.png"):
        assert f"]({name})" in report
        _png(full_run / name)


def test_resume_equals_uninterrupted_run(full_run: Path, tmp_path: Path) -> None:
    assert main(["train", *SMALL, "--epochs", "1", "--out", str(tmp_path), "--no-plots"]) == 0
    assert len(_epochs(tmp_path)) == 1
    assert main(["train", *SMALL, "--epochs", "2", "--out", str(tmp_path), "--no-plots", "--resume"]) == 0
    resumed, reference = read_jsonl(tmp_path / "metrics.jsonl"), read_jsonl(full_run / "metrics.jsonl")
    assert len(resumed) == len(reference)
    _assert_close([_stable(r) for r in reference], [_stable(r) for r in resumed])
    a = torch.load(full_run / "checkpoints" / "epoch_002.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "checkpoints" / "epoch_002.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


def test_resume_rejects_other_settings(
    full_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A copy of the run's checkpoint, resumed with another seed: refused before any worker starts.
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "epoch_001.pt").write_bytes(
        (full_run / "checkpoints" / "epoch_001.pt").read_bytes()
    )
    argv = ["train", *SMALL, "--epochs", "2", "--out", str(tmp_path), "--resume", "--seed", "1", "--no-plots"]
    assert main(argv) == 2
    assert "written with other settings: seed: checkpoint 0, now 1" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_nodes_with_torchrun(full_run: Path, tmp_path: Path) -> None:
    """Two launcher processes (--nnodes 2, c10d rendezvous on 127.0.0.1), one worker each."""
    port, run_id = _free_port(), uuid.uuid4().hex[:8]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--node-rank",
                str(node),
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                run_id,
                "--max-restarts",
                "0",
                "-m",
                "actreg.demo.train",
                "--epochs",
                "1",
                "--batch-size",
                "64",
                "--out",
                str(tmp_path),
                "--no-plots",
                "--no-progress",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for node in (0, 1)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    (epoch,) = _epochs(tmp_path)
    assert epoch["world_size"] == 2
    # Same 2 ranks, same data and seed: the two-node run equals the single-node one.
    _assert_close(_stable(_epochs(full_run)[0]), _stable(epoch))


def test_compare(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", *SMALL, "--epochs", "1", "--out", str(tmp_path)]) == 0
    table = capfd.readouterr().out
    assert "rank dis." in table and "global" in table
    data = json.loads((tmp_path / "compare.json").read_text())
    rows = {r["mode"]: r for r in data["rows"]}
    assert list(rows) == ["none", "local", "global", "ema"]
    assert all(finite(r) for r in rows.values())
    assert rows["none"]["objective_error"] is None
    assert rows["global"]["objective_error"] == 0.0
    assert rows["local"]["objective_error"] > 1e-3  # per-rank penalties are not the global one
    assert rows["none"]["penalty_global"] > rows["global"]["penalty_global"]  # the penalty works
    assert rows["none"]["active_fraction"]["act1"] > rows["global"]["active_fraction"]["act1"]
    for mode in rows:
        assert len(_epochs(tmp_path / mode)) == 1
    text = (tmp_path / "compare.md").read_text()
    assert "| `local` |" in text and "![comparison](compare.png)" in text
    _png(tmp_path / "compare.png")
    _png(tmp_path / "compare_histograms.png")


def test_verify_demo_passes_via_console_script() -> None:
    script = Path(sys.executable).with_name("actreg")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "actreg.cli"]
    proc = subprocess.run([*command, "verify"], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS: 2 ranks with sync='global'" in proc.stdout
    assert "shards [19, 18]" in proc.stdout


FACTORY = """
import torch
import actreg
from torch import nn

def make():
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 4))
    x = torch.randn(11, 6)
    return model, x, {"1": actreg.DeCov(0.3), "2": [actreg.VarianceFloor(1.0), actreg.L2(0.1)]}
"""


def test_verify_local_sync_fails_on_user_factory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "my_model.py"
    path.write_text(FACTORY)
    assert main(["verify", f"{path}:make", "--sync", "local"]) == 1
    out = capsys.readouterr().out
    assert "gradients of reg.loss()" in out and "shards [6, 5]" in out
    assert "FAIL: 2 ranks with sync='local'" in out


def test_bad_options_fail_before_launch(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--penalty", "act1=Bogus:1"]) == 2
    assert "unknown penalty 'Bogus'" in capsys.readouterr().err
    assert main(["verify", "no_such_module_xyz:f"]) == 2
    assert "cannot import" in capsys.readouterr().err
