"""Checkpoints of the demo training: numeric order, verification, fallback, keep-K, history, resume.

The training runs are in-process (one rank, no process group) and tiny; the reference of a resumed
run is the uninterrupted run with the same settings.
"""

from __future__ import annotations

import dataclasses
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from actreg.demo import checkpoints as ck
from actreg.demo.checkpoints import (
    CheckpointError,
    find_resume_point,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_history,
    resume_mismatch,
    save_checkpoint,
)
from actreg.demo.config import TrainConfig
from actreg.demo.report import read_jsonl

pytest.importorskip("sklearn")
pytest.importorskip("rich")

EPOCHS = 3
TINY = {"epochs": EPOCHS, "batch_size": 256, "hidden": [32, 16], "progress": False, "plots": False, "keep": 2}


def _state(epoch: int, cfg: TrainConfig | None = None) -> dict[str, Any]:
    g = torch.Generator().manual_seed(epoch)
    return {
        "epoch": epoch,
        "model": {"w": torch.randn(64, 32, generator=g), "b": torch.zeros(32)},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"params": [0]}]},
        "regularizer": {},
        "config": (cfg or TrainConfig()).to_dict(),
        "world_size": 2,
        "torch_rng": torch.get_rng_state(),
    }


def _zero_tensor_bytes(path: Path, count: int = 2000) -> None:
    """Zero ``count`` bytes inside the largest tensor record of a ``torch.save`` zip (still loads)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    assert info.file_size >= count
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start : start + count] = bytes(count)
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------- files
def test_latest_checkpoint_orders_epochs_as_numbers(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    for name in ("epoch_999.pt", "epoch_1000.pt", "epoch_002.pt", "epoch_x.pt", ".epoch_1001.pt.tmp7"):
        (directory / name).write_bytes(b"")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch_002.pt", "epoch_999.pt", "epoch_1000.pt"]
    assert latest_checkpoint(tmp_path) == directory / "epoch_1000.pt"
    assert ck.checkpoint_path(tmp_path, 1000).name == "epoch_1000.pt"


def test_checkpoint_round_trip_loads_with_plain_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "epoch_001.pt"
    state = _state(1)
    save_checkpoint(path, state)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left
    plain = torch.load(path, weights_only=True)
    assert plain["version"] == ck.CHECKPOINT_VERSION and len(plain["sha256"]) == 64
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["config"] == state["config"]


def test_failed_write_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "epoch_001.pt"
    save_checkpoint(path, _state(1))
    before = path.read_bytes()

    def full_disk(obj: Any, fh: Any) -> None:
        fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, _state(2))
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("damage", ["empty", "truncated", "zeroed", "flipped config"])
def test_damaged_checkpoint_is_named(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "epoch_003.pt"
    state = _state(3)
    save_checkpoint(path, state)
    data = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "zeroed":
        _zero_tensor_bytes(path)
        # Without verification it loads, with other weights: the damage is silent.
        silent = torch.load(path, weights_only=True)["model"]["w"]
        assert not torch.equal(silent, state["model"]["w"])
    else:  # a valid file whose content was changed after the digest was taken
        full = torch.load(path, weights_only=True)
        full["config"]["seed"] = 7
        torch.save(full, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and info.value.path == path
    assert ("unreadable" if damage in ("empty", "truncated") else "damaged") in str(info.value)


def test_fallback_to_the_newest_good_checkpoint(tmp_path: Path) -> None:
    for epoch in (1, 2, 3):
        save_checkpoint(ck.checkpoint_path(tmp_path, epoch), _state(epoch))
    ck.checkpoint_path(tmp_path, 3).write_bytes(b"")
    _zero_tensor_bytes(ck.checkpoint_path(tmp_path, 2))
    point = find_resume_point(tmp_path)
    assert point is not None and point.epoch == 1 and point.path.name == "epoch_001.pt"
    warnings = point.warnings()
    assert len(warnings) == 2 and "epoch_003.pt" in warnings[0] and "epoch_002.pt" in warnings[1]
    assert all("falling back to" in w and "epoch_001.pt" in w for w in warnings)
    ck.checkpoint_path(tmp_path, 1).write_bytes(b"junk")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint.*_003.*_002.*_001.*--overwrite"):
        find_resume_point(tmp_path)


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    for epoch in (1, 2, 9, 10):
        ck.checkpoint_path(tmp_path, epoch).parent.mkdir(exist_ok=True)
        ck.checkpoint_path(tmp_path, epoch).write_bytes(b"")
    stale = ck.checkpoint_dir(tmp_path) / ".epoch_011.pt.tmp999999999"  # a writer killed mid-save
    stale.write_bytes(b"partial")
    removed = ck.prune_checkpoints(tmp_path, 2)
    assert [p.name for p in removed] == ["epoch_001.pt", "epoch_002.pt"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch_009.pt", "epoch_010.pt"]
    assert not stale.exists()


# ---------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    ("saved", "now", "same"),
    [
        ("L1:2e-3", "L1:0.002", True),
        ("l1:2e-3", "L1:2E-3", True),
        ("VarianceFloor:1", "VarianceFloor:1.0:gamma=1:eps=0.0001", True),
        ("KLSparsity:0.05:1e-2", "KLSparsity:target=0.05:weight=0.01", True),
        ("L1:2e-3", "L1:2.1e-3", False),
        ("L1:2e-3", "L2:2e-3", False),
    ],
)
def test_resume_compares_penalty_values_not_spellings(saved: str, now: str, same: bool) -> None:
    old = TrainConfig(penalties={"act1": [saved]}).to_dict()
    bad = resume_mismatch(old, TrainConfig(penalties={"act1": [now]}))
    assert bad == [] if same else bad and bad[0].startswith("penalties:")


def test_read_history_truncates_and_stops_at_a_damaged_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [
        '{"type": "step", "epoch": 1, "step": 1}',
        '{"type": "epoch", "epoch": 1}',
        '{"type": "step", "epoch": 2, "step": 2}',
        '{"type": "epoch", "epoch": 2}',
        '{"type": "step", "epoch": 3, "st',
    ]
    path.write_text("\n".join(lines) + "\n")
    records, warnings = read_history(path, 1)
    assert [(r["type"], r["epoch"]) for r in records] == [("step", 1), ("epoch", 1)]
    assert len(warnings) == 1 and "line 5 is damaged" in warnings[0]
    records, warnings = read_history(path, 3)
    assert len(records) == 4 and "lacks the records of epoch(s) [3]" in warnings[-1]


# ---------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted tiny run of 3 epochs, keeping the last 2 checkpoints."""
    from actreg.demo.train import DistContext, run_training

    out = tmp_path_factory.mktemp("reference")
    run_training(TrainConfig(**TINY, out=str(out)).validate(), DistContext())
    return out


def _stable(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in records]


def _assert_close(a: Any, b: Any, where: str = "") -> None:
    """Nested equality, floats to 1e-6 relative."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_close(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-6, abs=1e-6), where  # abs: relative disagreements near 0
    else:
        assert a == b, where


def test_run_keeps_k_checkpoints_without_history(reference: Path) -> None:
    files = list_checkpoints(reference)
    assert [p.name for p in files] == ["epoch_002.pt", "epoch_003.pt"]
    states = [torch.load(p, weights_only=True) for p in files]
    assert all("history" not in s for s in states)
    sizes = [p.stat().st_size for p in files]
    assert abs(sizes[1] - sizes[0]) < 0.01 * sizes[0]  # no growth with the number of epochs
    epochs = [r["epoch"] for r in read_jsonl(reference / "metrics.jsonl") if r["type"] == "epoch"]
    assert epochs == [1, 2, 3]


def test_resume_past_a_damaged_checkpoint_equals_the_uninterrupted_run(
    reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from actreg.demo.train import DistContext, run_training

    out = tmp_path / "run"
    shutil.copytree(reference, out, ignore=shutil.ignore_patterns(".lock"))
    _zero_tensor_bytes(ck.checkpoint_path(out, 3))  # the newest: loads, but with other weights
    cfg = TrainConfig(**TINY, out=str(out), resume=True).validate()
    result = run_training(cfg, DistContext())
    text = capsys.readouterr().out
    assert "skipped checkpoint" in text and "epoch_003.pt: damaged" in text
    assert "falling back to" in text and "epoch_002.pt" in text
    assert (out / "checkpoints" / "epoch_003.pt.damaged").is_file()
    # The history was read back up to epoch 2 and epoch 3 trained again: same records, no duplicates.
    resumed, expected = read_jsonl(out / "metrics.jsonl"), read_jsonl(reference / "metrics.jsonl")
    assert len(resumed) == len(expected)
    _assert_close(_stable(expected), _stable(resumed))
    assert [r["epoch"] for r in result.epochs] == [1, 2, 3]
    final = load_checkpoint(ck.checkpoint_path(out, 3))["model"]
    ref = load_checkpoint(ck.checkpoint_path(reference, 3))["model"]
    assert all(torch.allclose(final[k], ref[k], rtol=0, atol=1e-6) for k in ref)


def test_resume_at_the_last_epoch_is_already_complete(
    reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from actreg.demo.train import DistContext, run_training

    out = tmp_path / "run"
    shutil.copytree(reference, out, ignore=shutil.ignore_patterns(".lock"))
    before = ck.checkpoint_path(out, 3).read_bytes()
    cfg = dataclasses.replace(TrainConfig(**TINY, out=str(out)), resume=True).validate()
    result = run_training(cfg, DistContext())
    assert "already complete" in capsys.readouterr().out
    assert ck.checkpoint_path(out, 3).read_bytes() == before
    assert [r["epoch"] for r in result.epochs] == [1, 2, 3]
