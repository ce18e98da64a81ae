"""``actreg train --tensorboard``: the run's step and epoch records as TensorBoard scalars.

Rank 0 writes ``<out>/tensorboard`` with ``torch.utils.tensorboard.SummaryWriter`` (the optional
``tensorboard`` package). Tags, at the global step (1-based, as in ``metrics.jsonl``):

* ``train/loss``, ``train/acc``, ``penalty/global``, ``penalty/optimized``, ``penalty/objective_error``,
  ``penalty/rank_disagreement`` -- per step;
* ``<layer>/<name>`` -- the global-batch ``reg.metrics()`` of the step (``act1/L1``,
  ``act1/active_fraction``, ...);
* ``epoch/train_loss``, ``epoch/test_loss``, ``epoch/test_acc``, ``epoch/penalty_global``,
  ``epoch/<layer>/test_active_fraction`` -- per epoch, at the epoch's last step.

A resumed run starts its writer with ``purge_step`` at its first step, so events of steps that are
trained again (after a fallback to an older checkpoint) replace the old ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ._deps import require

STEP_TAGS = {
    "loss": "train/loss",
    "acc": "train/acc",
    "penalty_global": "penalty/global",
    "penalty_opt": "penalty/optimized",
    "objective_error": "penalty/objective_error",
    "rank_disagreement": "penalty/rank_disagreement",
}
EPOCH_TAGS = {
    "train_loss": "epoch/train_loss",
    "test_loss": "epoch/test_loss",
    "test_acc": "epoch/test_acc",
    "penalty_global": "epoch/penalty_global",
    "objective_error": "epoch/objective_error",
}


def require_tensorboard() -> Any:
    """``torch.utils.tensorboard`` or :class:`~actreg.demo._deps.MissingDependencyError` (exit 2)."""
    require("tensorboard")
    return require("torch.utils.tensorboard")


class TensorBoardLog:
    """Scalars of the run's records in ``directory`` (rank 0 only)."""

    def __init__(self, directory: str | Path, *, first_step: int = 1) -> None:
        tb = require_tensorboard()
        self.writer = tb.SummaryWriter(log_dir=str(directory), purge_step=first_step)

    def write(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Write step and epoch records (as appended to ``metrics.jsonl``), then flush."""
        last_step = 0
        for rec in records:
            if rec["type"] == "step":
                last_step = int(rec["step"])
                for key, tag in STEP_TAGS.items():
                    self._scalar(tag, rec.get(key), last_step)
                for key, value in rec["global"].items():
                    self._scalar(key, value, last_step)
            elif rec["type"] == "epoch":
                for key, tag in EPOCH_TAGS.items():
                    self._scalar(tag, rec.get(key), last_step)
                for layer, figures in rec["test_activity"].items():
                    self._scalar(f"epoch/{layer}/test_active_fraction", figures["active_fraction"], last_step)
        self.writer.flush()

    def _scalar(self, tag: str, value: Any, step: int) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            self.writer.add_scalar(tag, float(value), step)

    def close(self) -> None:
        self.writer.close()
