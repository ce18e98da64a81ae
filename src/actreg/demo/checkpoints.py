"""Checkpoints of the demo training: ``<out>/checkpoints/epoch_NNN.pt``, verified, with a fallback.

A checkpoint is a ``torch.save``d dict that loads with ``torch.load(path, weights_only=True)``:
``version``, ``sha256``, ``epoch``, ``model``, ``optimizer``, ``regularizer``, ``config``,
``world_size``, ``torch_rng``. ``sha256`` is a digest of every other entry's *content* (tensors'
dtype, shape and bytes; numbers; strings; containers), so a file that loads but was damaged --
zeroed or flipped bytes inside a tensor -- is told apart from a good one. Writes go to a temporary
file in the same directory, are fsync'ed and ``os.replace``d (atomic), and only the newest ``keep``
checkpoints are kept. The history of the run is not in the checkpoints: ``metrics.jsonl`` holds it
once, and a resumed run reads it back up to the checkpoint's epoch.

On ``--resume`` the newest checkpoint that loads and verifies is used; newer damaged ones are named
in a warning (and moved aside to ``epoch_NNN.pt.damaged`` by the run that resumes, so that they are
neither kept in place of good ones nor picked again).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig, canonical_penalties

CHECKPOINT_VERSION = 2
#: Entries every checkpoint holds besides ``version`` and ``sha256``.
STATE_KEYS = ("epoch", "model", "optimizer", "regularizer", "config", "world_size", "torch_rng")
#: Settings that must match for ``--resume`` (epochs, world size, keep and outputs may change).
RESUME_KEYS = ("sync", "penalties", "batch_size", "seed", "lr", "decay", "hidden", "test_fraction")
_NAME = re.compile(r"^epoch_(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (unreadable, damaged, or of another format); names the file."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path


# ---------------------------------------------------------------------- names
def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def checkpoint_path(out: str | Path, epoch: int) -> Path:
    """``<out>/checkpoints/epoch_NNN.pt`` (at least 3 digits; epoch 1000 is ``epoch_1000.pt``)."""
    return checkpoint_dir(out) / f"epoch_{epoch:03d}.pt"


def checkpoint_epoch(path: str | Path) -> int | None:
    """The epoch in a checkpoint's file name, or None if the name is not ``epoch_<N>.pt``."""
    match = _NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(out: str | Path) -> list[Path]:
    """The checkpoint files in ``<out>/checkpoints``, by epoch (as numbers: 999 before 1000)."""
    directory = checkpoint_dir(out)
    if not directory.is_dir():
        return []
    found = [(checkpoint_epoch(p), p) for p in directory.iterdir() if p.is_file()]
    return [p for epoch, p in sorted((e, p) for e, p in found if e is not None)]


def latest_checkpoint(out: str | Path) -> Path | None:
    """The checkpoint file of the highest epoch in ``out/checkpoints`` (None if there is none)."""
    files = list_checkpoints(out)
    return files[-1] if files else None


# ---------------------------------------------------------------------- content digest
def state_digest(obj: Any) -> str:
    """SHA-256 of the content of ``obj`` (nested dicts, lists, tuples, tensors, numbers, strings).

    Independent of the file format: dict entries are taken in sorted key order, tensors by dtype,
    shape and bytes (on the CPU), floats by ``repr`` (exact).
    """
    h = hashlib.sha256()
    _digest(obj, h)
    return h.hexdigest()


def _digest(obj: Any, h: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu", copy=True).contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        h.update(bytes(t.untyped_storage()))
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)}:".encode())
        for key in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            _digest(key, h)
            _digest(obj[key], h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}:".encode())
        for item in obj:
            _digest(item, h)
    elif obj is None or isinstance(obj, (bool, int, float, str, torch.dtype, torch.device)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:
        raise TypeError(f"checkpoint entries are tensors, containers, numbers or strings, not {type(obj)}")


# ---------------------------------------------------------------------- write and read
def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` (the :data:`STATE_KEYS`) with its version and digest, atomically.

    ``torch.save`` to a temporary file in the same directory, fsync, ``os.replace``, fsync of the
    directory: after a crash the file is either the previous one or the complete new one.
    """
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"save_checkpoint({path}): state lacks {missing}")
    payload = {k: state[k] for k in STATE_KEYS}
    full = {"version": CHECKPOINT_VERSION, "sha256": state_digest(payload), **payload}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(full, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A verified checkpoint, loaded with ``weights_only=True`` (tensors, containers, numbers only).

    Raises :class:`CheckpointError` naming ``path`` when it cannot be read (empty, truncated, not a
    checkpoint), is of another version, lacks entries, or its content does not match its digest.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types on a damaged file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(path, f"unreadable ({type(err).__name__}: {first[:200]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(path, f"not a checkpoint (a {type(state).__name__}, not a dict)")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            path,
            f"checkpoint version {state.get('version')!r}, this actreg reads version "
            f"{CHECKPOINT_VERSION} (start a new run with --overwrite)"
        )
    missing = [k for k in ("sha256", *STATE_KEYS) if k not in state]
    if missing:
        raise CheckpointError(path, f"damaged (missing entries {missing})")
    payload = {k: state[k] for k in STATE_KEYS}
    if state_digest(payload) != state["sha256"]:
        raise CheckpointError(path, "damaged (content does not match its sha256 digest)")
    return payload


# ---------------------------------------------------------------------- resume
@dataclass
class ResumePoint:
    """The newest good checkpoint of a run directory and the newer ones that were skipped."""

    path: Path
    state: dict[str, Any]
    skipped: list[CheckpointError] = field(default_factory=list)

    @property
    def epoch(self) -> int:
        return int(self.state["epoch"])

    def warnings(self) -> list[str]:
        return [f"warning: skipped checkpoint {err}; falling back to {self.path}" for err in self.skipped]


def find_resume_point(out: str | Path) -> ResumePoint | None:
    """The newest checkpoint of ``out`` that loads and verifies (None when there is no checkpoint).

    Raises :class:`CheckpointError` naming every file when there are checkpoints but none is good.
    """
    skipped: list[CheckpointError] = []
    for path in reversed(list_checkpoints(out)):
        try:
            state = load_checkpoint(path)
        except CheckpointError as err:
            skipped.append(err)
            continue
        if state["epoch"] != checkpoint_epoch(path):
            skipped.append(CheckpointError(path, f"holds epoch {state['epoch']}, not the one of its name"))
            continue
        return ResumePoint(path, state, skipped)
    if skipped:
        raise CheckpointError(
            checkpoint_dir(out),
            "no usable checkpoint: "
            + "; ".join(str(e) for e in skipped)
            + ". Start afresh with --overwrite (this deletes them)."
        )
    return None


def resume_mismatch(saved: Mapping[str, Any], cfg: TrainConfig) -> list[str]:
    """The settings (of :data:`RESUME_KEYS`) in which ``cfg`` differs from a checkpoint's config.

    Values are compared, not spellings: ``L1:2e-3`` matches ``L1:0.002``.
    """
    now = cfg.to_dict()
    bad = []
    for key in RESUME_KEYS:
        old, new = saved.get(key), now[key]
        if key == "penalties":
            try:
                same = canonical_penalties(old or {}) == canonical_penalties(new)
            except ValueError:
                same = False
        else:
            same = old == new
        if not same:
            bad.append(f"{key}: checkpoint {old!r}, now {new!r}")
    return bad


def check_resume(point: ResumePoint, cfg: TrainConfig) -> None:
    """Raise ``ValueError`` if ``cfg`` cannot continue ``point`` (other settings, fewer epochs)."""
    bad = resume_mismatch(point.state["config"], cfg)
    if bad:
        raise ValueError(f"--resume: {point.path} was written with other settings: " + "; ".join(bad))
    if cfg.epochs < point.epoch:
        raise ValueError(
            f"--resume: {point.path} is at epoch {point.epoch}, beyond --epochs {cfg.epochs} (the total "
            f"number of epochs, not the number to add); give --epochs {point.epoch + 1} or more to train on"
        )


def set_aside(errors: list[CheckpointError], warn: Callable[[str], None]) -> None:
    """Rename skipped (damaged) checkpoints to ``*.damaged`` so that no later step picks or keeps them."""
    for err in errors:
        if err.path.is_file():
            target = err.path.with_name(err.path.name + ".damaged")
            os.replace(err.path, target)
            warn(f"moved {err.path} aside to {target.name}")


def prune_checkpoints(out: str | Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest checkpoints of ``out``; return the deleted files.

    Also removes temporary files that a killed writer left behind (``.epoch_NNN.pt.tmpPID`` of
    another process: the run directory is locked, so no other writer is alive).
    """
    files = list_checkpoints(out)
    doomed = files[: max(len(files) - keep, 0)]
    for path in doomed:
        path.unlink(missing_ok=True)
    mine = f".tmp{os.getpid()}"
    for stale in checkpoint_dir(out).glob(".epoch_*.pt.tmp*"):
        if not stale.name.endswith(mine):
            stale.unlink(missing_ok=True)
    return doomed


# ---------------------------------------------------------------------- history
def read_history(path: str | Path, epoch: int) -> tuple[list[dict[str, Any]], list[str]]:
    """The records of ``metrics.jsonl`` up to (and including) ``epoch``, and warnings.

    Stops at the first line that is not a JSON object (a damaged tail); warns when epochs up to
    ``epoch`` are missing (the report then lacks them; the training itself is unaffected).
    """
    path = Path(path)
    warnings: list[str] = []
    records: list[dict[str, Any]] = []
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            warnings.append(f"warning: {path} line {number} is damaged; the history is read up to it")
            break
        if record["epoch"] <= epoch:
            records.append(record)
    done = {r["epoch"] for r in records if r.get("type") == "epoch"}
    lacking = [e for e in range(1, epoch + 1) if e not in done]
    if lacking:
        warnings.append(
            f"warning: {path} lacks the records of epoch(s) {lacking}; the report will miss them"
        )
    return records, warnings
