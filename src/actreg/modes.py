"""The synchronisation modes, defined once: what each one communicates and keeps."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    """``local``: per-worker statistics, no communication; ``global``: the statistics of the global
    batch (one collective per step, exact gradients); ``ema``: a moving average of global
    statistics."""

    name: str
    communicates: bool  #: sums statistics over the data-parallel group
    moving_average: bool  #: penalties see ``E_t = decay E_{t-1} + (1 - decay) S_t``


MODES = {
    m.name: m for m in (Mode("local", False, False), Mode("global", True, False), Mode("ema", True, True))
}
#: the names accepted by ``ActivityRegularizer(sync=...)`` and the command line
SYNC_MODES = tuple(MODES)


def mode(name: str) -> Mode:
    if name not in MODES:
        raise ValueError(f"sync must be one of {SYNC_MODES}, got {name!r}")
    return MODES[name]
