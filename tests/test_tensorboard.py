"""``actreg train --tensorboard``: the step and epoch records as TensorBoard scalars, read back."""

from __future__ import annotations

from pathlib import Path

import pytest

from actreg.demo.config import TrainConfig
from actreg.demo.report import read_jsonl

pytest.importorskip("sklearn")
pytest.importorskip("rich")
pytest.importorskip("tensorboard")


def test_tensorboard_scalars_match_metrics_jsonl(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from actreg.demo.train import DistContext, run_training

    small = {"epochs": 2, "batch_size": 512, "hidden": [16, 8], "progress": False, "plots": False}
    cfg = TrainConfig(out=str(tmp_path), tensorboard=True, **small)
    assert "--tensorboard" in cfg.to_argv()
    run_training(cfg.validate(), DistContext())
    records = read_jsonl(tmp_path / "metrics.jsonl")
    steps = [r for r in records if r["type"] == "step"]
    epochs = [r for r in records if r["type"] == "epoch"]

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "penalty/global", "act1/L1", "act2/DeCov", "act1/active_fraction"} <= tags
    assert {"epoch/test_acc", "epoch/act2/test_active_fraction"} <= tags

    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    assert [e.value for e in loss] == pytest.approx([s["loss"] for s in steps], rel=1e-6)
    l1 = events.Scalars("act1/L1")
    assert [e.value for e in l1] == pytest.approx([s["global"]["act1/L1"] for s in steps], rel=1e-6)
    acc = events.Scalars("epoch/test_acc")
    assert [e.value for e in acc] == pytest.approx([e["test_acc"] for e in epochs], rel=1e-6)
    assert acc[-1].step == steps[-1]["step"]
