"""Checks that ``actreg train`` / ``actreg compare`` run before any worker starts (exit code 2).

:func:`validate_before_launch` is called by the command after ``TrainConfig.validate()`` (which
checks each setting alone): it checks the settings against the demo model (penalty patterns that
match no module, penalties that do not fit a layer), the output directory (writable, not a file,
not another run's unless ``--resume``/``--overwrite``), locks it for the run, and on ``--resume``
checks the checkpoint the workers will continue (good, same settings, ``--epochs`` not below it).
Every failure is a ``ValueError`` whose message says what to do.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch

import actreg

from .checkpoints import check_resume, find_resume_point
from .config import TrainConfig, build_penalties
from .model import DigitsMLP
from .rundir import check_reuse, lock_run_directory, prepare_output
from .tblog import require_tensorboard

#: Input features and classes of the digits (``Digits.num_features``, ``Digits.num_classes``).
DIGITS_SHAPE = (64, 10)


def check_penalties_fit(cfg: TrainConfig) -> None:
    """One forward and ``loss()`` of the demo model with ``cfg``'s penalties on a random batch.

    Raises ``ValueError`` for a pattern that matches no module and for a penalty the layer's output
    does not fit (e.g. ``LoadBalance:8`` on a 128-wide layer).
    """
    features, classes = DIGITS_SHAPE
    model = DigitsMLP(features, cfg.hidden, classes)
    hidden = ",".join(map(str, cfg.hidden))
    try:
        reg = actreg.ActivityRegularizer(model, build_penalties(cfg.penalties), sync="local")
    except (ValueError, TypeError) as err:
        raise ValueError(f"--penalty: {err}") from None
    try:
        model(torch.randn(4, features, generator=torch.Generator().manual_seed(0)))
        reg.loss()
        reg.check()
    except (actreg.ActregError, ValueError, TypeError) as err:
        text = str(err).split("recording failed on this rank in step 1: ", 1)[-1]
        raise ValueError(f"--penalty: the demo model (--hidden {hidden}) does not fit: {text}") from None
    finally:
        reg.remove()


def validate_before_launch(cfg: TrainConfig, modes: Sequence[str] | None = None) -> None:
    """Everything that can fail before the workers start; ``modes``: ``actreg compare``'s runs.

    Locks ``cfg.out`` for this process (held until it exits; the workers it starts see that their
    parent holds it). Prints warnings (damaged checkpoints skipped on ``--resume``) to stderr.
    """
    if modes is not None and cfg.resume:
        raise ValueError("--resume: actreg compare trains every mode from scratch; use --overwrite to rerun")
    if cfg.tensorboard:
        require_tensorboard()
    check_penalties_fit(cfg)
    runs = [Path(cfg.out)] if modes is None else [Path(cfg.out) / m for m in modes]
    if modes is not None:  # compare's top directory holds compare.md and the mode directories only
        prepare_output(cfg.out, checkpoints=False)
    for run_dir in runs:
        prepare_output(run_dir, tensorboard=cfg.tensorboard)
    lock_run_directory(cfg.out)
    for run_dir in runs:
        if cfg.resume:
            point = find_resume_point(run_dir)
            if point is not None:
                for line in point.warnings():
                    print(f"actreg: {line}", file=sys.stderr)
                check_resume(point, cfg)
        else:
            check_reuse(cfg, run_dir)
