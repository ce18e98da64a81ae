"""A differential soak: seeded random scenarios against a float64 single-process reference.

Every scenario is drawn from one integer seed (:meth:`Scenario.draw`): world size 1-3, uneven and
empty shards, 0/1/many batches per rank under ``Join``, padding masks (all-False steps included), a
slot (``side``) that starts late or skips steps, penalties of every family on three slots,
``global``/``ema``/``local``, ``weights=``, non-finite values injected at random steps,
``nonfinite="skip"``/``"raise"``, a checkpoint (model, optimizer, regularizer) saved and loaded
into fresh objects mid-run, a frozen BatchNorm (buffers, ``broadcast_buffers`` on or off), SGD with
or without momentum, two regularizers in one ``Join`` called in either order, and float32 models
with a large activation mean (the centring shift) beside the float64 ones. Some scenarios are
misuse: ranks that built different penalties or weight penalties, or ``nonfinite="raise"`` with an
injected NaN.

:func:`reference` computes each scenario in one float64 process from the published formulas (the
penalties' sums and values as in ``tests/reference.py``, written again here with their
hyperparameters; not actreg's code path). :func:`run_rank` runs it on every rank of a
``tests/_pool.py`` ``WorkerPool`` (DDP over gloo). :func:`check` compares: every training rank's
``reg.loss()`` value and ``metrics()["total"]`` per step, its DDP-averaged gradients, the final
parameters on every rank, ``skipped_steps``, the state step count, and ``state_dict()`` identical on
every rank (``global``/``ema``). A misuse scenario must raise the documented error type on *every*
rank. A scenario that does not finish within its deadline (30 s, ``--deadline``) is a hang: every
rank arms ``faulthandler.dump_traceback_later`` into a file of its own, and the failure carries
every rank's stack and how each rank left (finished, raised what, or still running).

Each failure is classified as one of the known defects of the issue "Faults, round 3" it could be
(:data:`KNOWN`; :func:`classify`, from the scenario's features and the symptom), as one the soak
found itself (:data:`FOUND`, ``NEW:<name>``), or as ``NEW``.

Running it:

* the short fixed set, part of the test suite (<= 60 s): ``python -m pytest tests/test_soak.py``;
* the long mode, skipped in the normal suite, runs random seeds for as long as you give it and
  prints the number of scenarios, the failures by class and each failing seed with a one-line
  repro::

      ACTREG_SOAK_MINUTES=30 python -m pytest tests/test_soak.py -k long -s
      python tests/soak.py --minutes 30            # the same, without pytest
      python tests/soak.py --seed 1234 -v          # one scenario: what it is, and its outcome
      python tests/soak.py --seed 1234 --shrink    # reduce a failing seed to a smaller scenario

  ``--avoid duplicate-penalty`` (``ACTREG_SOAK_AVOID``) leaves out the combination of a defect
  found already, so that a long run looks for others (a repro then prints the whole scenario).
  ``--start SEED`` (under pytest ``ACTREG_SOAK_START``) picks the first seed (default: from the
  clock; seeds then count up). The long mode fails (exit status 1) if any scenario failed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import faulthandler
import io
import json
import math
import os
import random
import re
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

FAMILIES = (
    "L1",
    "L2",
    "AR",
    "TAR",
    "KLSparsity",
    "DeCov",
    "VarianceFloor",
    "Covariance",
    "LoadBalance",
    "ZLoss",
)
CENTRED = frozenset({"DeCov", "VarianceFloor", "Covariance"})
IN_FEATURES, HIDDEN, EXPERTS, TIME = 3, 4, 3, 3
SLOT_DIMS = {"sig": HIDDEN, "head": EXPERTS, "side": HIDDEN}
TASK = 0.05  #: task loss: TASK * sum of y^2 over the rank's rows (DDP averages it)
ERRORS = ("LayoutMismatchError", "NonFiniteStatisticError", "RecordingError")

#: defects the soak found that the issue did not list (see the report of the soak's first runs)
FOUND = {
    "NEW:duplicate-penalty": "two penalties of one family on one slot (L1 + L1): backward raises "
    "'more than one element of the written-to tensor refers to a single memory location' (values.py; "
    "fixed: babd3eb)",
    "NEW:late-dtype": "a regularizer whose first loss() saw no recorded activation agrees on float32 "
    "statistics: float64 activations recorded later are summed in float32 (errors ~1e-8; fixed: f4dcd55)",
    "NEW:ema-load-unrecorded": "sync='ema': a regularizer loaded with load_state_dict whose first step "
    "records nothing for a slot drops the loaded moving average (state_dict()['ema'] == {}): penalty 0 "
    "in that step, later values and gradients differ from the uninterrupted run",
}

#: the defects the issue "Faults, round 3" lists (being fixed while this was written)
KNOWN = {
    "join-0/1-batches": "Join hangs with a rank of 0/1 batches",
    "join-buffers": "Join hangs with model buffers under broadcast_buffers=True",
    "centred-late-shift": "a centred slot whose first step is late or fully masked is taken around shift 0",
    "centred-first-nonfinite": "a non-finite activation in a centred slot's first step breaks later steps",
    "skipped-steps": "skipped_steps never exceeds 1",
    "nan-grad": "NaN gradients through actreg's backward for non-finite activations",
    "weights-join-stale": "weights= under Join report stale values",
    "weights-per-rank": "different weight parameters per rank not detected",
    "two-regs-order": "two regularizers in one Join called in the other order abort",
}


# --------------------------------------------------------------------------- the scenario
@dataclass
class Scenario:
    """One soak scenario; every random choice is made by :meth:`draw` from ``seed``.

    ``batches[r]``: steps of rank r (uneven only under ``join``). ``side[t][r]``: whether the slot
    ``side`` runs at step t on rank r. ``masked``: steps whose mask is all-False on every rank.
    ``inject``: ``(step, rank, value)`` added to one kept position of ``side``. ``checkpoint``: the
    step before which everything is saved and loaded into fresh objects. ``two_regs``: ``side``'s
    penalties in a second regularizer, its ``loss()`` called after (``"listed"``) or before
    (``"reversed"``) the first's. ``misuse``: rank W-1 builds another ``"penalty"``, other
    ``"weights"`` (λ) or ``"weight-params"`` (another parameter of as many elements): a
    ``LayoutMismatchError`` is expected on every rank. ``data_seed``: the data
    and initial parameters (the shrinker changes the scenario but not its data).
    """

    seed: int
    world_size: int = 2
    sync: str = "global"
    decay: float = 0.8
    nonfinite: str = "skip"
    dtype: str = "float64"
    batches: tuple[int, ...] = (2, 2)
    join: bool = False
    penalties: dict[str, list[tuple[str, tuple[float, ...]]]] = field(default_factory=dict)
    side: tuple[tuple[bool, ...], ...] = ()
    masked: tuple[int, ...] = ()
    keep: float = 1.0
    rows: tuple[int, int] = (0, 4)
    inject: tuple[tuple[int, int, float], ...] = ()
    weights: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    bn: bool = False
    broadcast_buffers: bool = True
    checkpoint: int | None = None
    two_regs: str | None = None
    momentum: float = 0.0
    offset: float = 0.0
    misuse: str | None = None
    data_seed: int = -1
    fused: bool = False  #: the fused kernels (actreg.fused, compiled values) instead of eager statistics

    @property
    def steps(self) -> int:
        return max(self.batches)

    @property
    def expect(self) -> str | None:
        """The error every rank must raise, or None (the scenario must match the reference)."""
        if self.misuse is not None and self.world_size > 1:
            return "LayoutMismatchError"
        if self.nonfinite == "raise" and injected(self):
            return "NonFiniteStatisticError"
        return None

    @classmethod
    def draw(cls, seed: int) -> Scenario:
        """A random scenario from ``seed`` (the same seed gives the same scenario)."""
        rnd = random.Random(seed)
        w = rnd.choices([1, 2, 3], weights=[15, 45, 40])[0]
        sync = rnd.choice(["global", "ema", "local"])
        dtype = "float32" if rnd.random() < 0.15 else "float64"
        join = w > 1 and rnd.random() < 0.5
        if join:
            batches = [rnd.choice([0, 1, 1, 2, 3, 4]) for _ in range(w)]
            if max(batches) == 0:
                batches[rnd.randrange(w)] = rnd.randint(1, 4)
        else:
            batches = [rnd.randint(1, 4)] * w
        steps = max(batches)
        pens: dict[str, list[tuple[str, tuple[float, ...]]]] = {}
        for slot, p_any in (("sig", 0.8), ("head", 0.5), ("side", 0.6)):
            if rnd.random() < p_any:
                pens[slot] = [_draw_penalty(rnd, slot) for _ in range(rnd.choice([1, 1, 2]))]
        offset = 0.0
        if dtype == "float32":  # the centring shift matters: a large mean, a centred penalty on side
            offset = rnd.choice([-300.0, 200.0, 300.0])
            fam = rnd.choice(sorted(CENTRED))
            pens.setdefault("side", []).append(_draw_penalty(rnd, "side", fam))
        if not pens:
            pens["sig"] = [_draw_penalty(rnd, "sig")]
        how = rnd.choice(["always", "late", "random"])
        late = rnd.randint(1, max(1, steps - 1))
        side = tuple(
            tuple({"always": True, "late": t >= late, "random": rnd.random() < 0.6}[how] for _ in range(w))
            for t in range(steps)
        )
        masked = tuple(t for t in range(steps) if rnd.random() < 0.15)
        keep = rnd.choice([1.0, 0.7, 0.5])
        rows = rnd.choice([(0, 4), (1, 4), (0, 2), (2, 5)])
        weights: dict[str, list[tuple[str, float]]] = {}
        if rnd.random() < 0.35:
            for glob in rnd.sample(["lin1.weight", "head.*", "bn.weight"], rnd.randint(1, 2)):
                kinds = rnd.sample(["WeightL2", "WeightL1"], rnd.randint(1, 2))
                weights[glob] = [(k, round(rnd.uniform(0.05, 0.5), 3)) for k in kinds]
        bn = rnd.random() < 0.4
        weights = {g: v for g, v in weights.items() if bn or not g.startswith("bn")}
        nonfinite = "raise" if rnd.random() < 0.3 else "skip"
        inject: list[tuple[int, int, float]] = []
        if rnd.random() < 0.35 and not (nonfinite == "raise" and sync == "local"):
            for _ in range(1 if nonfinite == "raise" else rnd.randint(1, 3)):
                t = rnd.randrange(min(batches) if nonfinite == "raise" and min(batches) else steps)
                if nonfinite == "raise" and min(batches) == 0:
                    break  # raise under Join: only where every rank trains (a joined rank waits)
                r = rnd.randrange(w)
                inject.append((t, r, rnd.choice([math.nan, math.inf, -math.inf])))
        checkpoint = None
        if min(batches) >= 1 and rnd.random() < 0.3:
            checkpoint = rnd.randint(1, min(batches))
        two_regs = None
        if "side" in pens and len(pens) > 1 and rnd.random() < 0.25:
            two_regs = rnd.choice(["listed", "reversed"])
        misuse = None
        if w > 1 and rnd.random() < 0.07:
            misuse = rnd.choice(["penalty", "weights", "penalty", "weight-params"])
            if misuse == "weights" and not weights:
                weights = {"lin1.weight": [("WeightL2", 0.1)]}
            if misuse == "weight-params":  # rank W-1: head.weight [3, 4] for lin1.weight [4, 3]
                weights = {"lin1.weight": [("WeightL2", 0.1)]}
        return cls(
            seed=seed,
            world_size=w,
            sync=sync,
            decay=rnd.choice([0.5, 0.8, 0.9]),
            nonfinite=nonfinite,
            dtype=dtype,
            batches=tuple(batches),
            join=join,
            penalties=pens,
            side=side,
            masked=masked,
            keep=keep,
            rows=rows,
            inject=tuple(sorted({(t, r): (t, r, v) for t, r, v in inject}.values())),  # one per (t, r)
            weights=weights,
            bn=bn,
            broadcast_buffers=rnd.random() < 0.7,
            checkpoint=checkpoint,
            two_regs=two_regs,
            momentum=rnd.choice([0.0, 0.5]),
            offset=offset,
            misuse=misuse,
            data_seed=seed,
            # drawn last: every other draw of a seed is what it was before this feature
            fused=rnd.random() < 0.3,
        )

    def describe(self) -> str:
        """One line: the features of the scenario."""
        bits = [f"W={self.world_size}", self.sync, self.dtype, f"batches={list(self.batches)}"]
        bits += ["Join"] if self.join else []
        bits.append("pens=" + ",".join(f"{s}:{'+'.join(f for f, _ in p)}" for s, p in self.penalties.items()))
        bits += [f"weights={sorted(self.weights)}"] if self.weights else []
        bits += [f"inject={[(t, r) for t, r, _ in self.inject]}", self.nonfinite] if self.inject else []
        bits += [f"masked={list(self.masked)}"] if self.masked else []
        bits += [f"side_first={self.side_first()}"] if "side" in self.penalties else []
        bits += [f"bn(broadcast={self.broadcast_buffers})"] if self.bn else []
        bits += [f"ckpt@{self.checkpoint}"] if self.checkpoint is not None else []
        bits += [f"two_regs={self.two_regs}"] if self.two_regs else []
        bits += [f"offset={self.offset}"] if self.offset else []
        bits += [f"misuse={self.misuse}"] if self.misuse else []
        bits += ["fused"] if self.fused else []
        return " ".join(bits)

    def side_first(self) -> int | None:
        """The first step in which ``side`` runs on some training rank (None: never)."""
        for t in range(self.steps):
            if any(self.side[t][r] and self.batches[r] > t for r in range(self.world_size)):
                return t
        return None


def _draw_penalty(rnd: random.Random, slot: str, family: str | None = None) -> tuple[str, tuple[float, ...]]:
    fam = family or rnd.choice(FAMILIES)
    w = round(rnd.uniform(0.2, 2.0), 3)
    if fam == "KLSparsity":
        return fam, (round(rnd.uniform(0.1, 0.5), 3), w)
    if fam == "VarianceFloor":
        return fam, (w, round(rnd.uniform(0.3, 1.0), 3), 1e-4)
    if fam == "LoadBalance":  # (E, k, weight, 1.0 for DeepSeek-V3's sigmoid scores)
        return fam, (float(SLOT_DIMS[slot]), float(rnd.randint(1, 2)), w, float(rnd.random() < 0.4))
    if fam == "DeCov":
        return fam, (w * 5,)
    return fam, (w,)


def make_penalty(family: str, args: tuple[float, ...]) -> Any:
    """The actreg penalty object of ``(family, args)``."""
    import actreg

    if family == "TAR":
        return actreg.TAR(args[0], time_dim=1)
    if family == "LoadBalance":
        score = "sigmoid" if len(args) > 3 and args[3] else "softmax"
        return actreg.LoadBalance(int(args[0]), int(args[1]), args[2], score=score)
    return getattr(actreg, family)(*args)


# --------------------------------------------------------------------------- data and model
@dataclass
class Record:
    """One rank's input at one step."""

    x: Tensor  # [n, TIME, IN_FEATURES]
    mask: Tensor  # [n, TIME] bool
    inj: Tensor  # [n, TIME, HIDDEN]: zeros, or one non-finite value at a kept position
    side: bool


def dtype_of(scn: Scenario) -> torch.dtype:
    return torch.float32 if scn.dtype == "float32" else torch.float64


def plan(scn: Scenario) -> list[list[Record | None]]:
    """``plan[t][r]``: rank r's input at step t (None once it has run out).

    Each (step, rank) draws from a generator of its own, so a shrunk scenario keeps its data.
    """
    dt = dtype_of(scn)
    out: list[list[Record | None]] = []
    for t in range(scn.steps):
        step: list[Record | None] = []
        for r in range(scn.world_size):
            g = torch.Generator().manual_seed(1_000_003 * (scn.data_seed % 1_000_000) + 101 * t + r)
            lo, hi = scn.rows
            n = int(torch.randint(lo, hi + 1, (), generator=g))
            x = (torch.randn(n, TIME, IN_FEATURES, generator=g, dtype=torch.float64) * 1.5).to(dt)
            mask = torch.rand(n, TIME, generator=g) < scn.keep
            if t in scn.masked:
                mask[:] = False
            inj = torch.zeros(n, TIME, HIDDEN, dtype=dt)
            kept = mask.nonzero()
            for ti, ri, value in scn.inject:
                if ti == t and ri == r and scn.side[t][r] and len(kept):
                    i, j = kept[int(torch.randint(len(kept), (), generator=g))].tolist()
                    inj[i, j, int(torch.randint(HIDDEN, (), generator=g))] = value
            step.append(Record(x, mask, inj, scn.side[t][r]) if scn.batches[r] > t else None)
        out.append(step)
    return out


def injected(scn: Scenario) -> list[tuple[int, int]]:
    """The (step, rank) where a non-finite value really reaches a recorded, kept position."""
    if "side" not in scn.penalties:
        return []
    return [
        (t, r)
        for t, step in enumerate(plan(scn))
        for r, rec in enumerate(step)
        if rec is not None and not bool(torch.isfinite(rec.inj).all())
    ]


class Side(nn.Module):
    """A parameterless slot fed from the hidden layer, not part of the task: ``tanh(h) + offset + inj``."""

    def __init__(self, offset: float) -> None:
        super().__init__()
        self.offset = offset

    def forward(self, h: Tensor, inj: Tensor) -> Tensor:
        return torch.tanh(h) + self.offset + inj


class Net(nn.Module):
    """``lin1 -> sig (Sigmoid) -> [bn: frozen BatchNorm] -> head``; ``side`` runs on ``sig`` when asked."""

    def __init__(self, scn: Scenario) -> None:
        super().__init__()
        torch.manual_seed(scn.data_seed)
        self.lin1 = nn.Linear(IN_FEATURES, HIDDEN)
        self.sig = nn.Sigmoid()
        self.bn = nn.BatchNorm1d(HIDDEN) if scn.bn else None
        self.head = nn.Linear(HIDDEN, EXPERTS)
        self.side = Side(scn.offset)
        if self.bn is not None:
            with torch.no_grad():
                self.bn.running_mean.uniform_(0.2, 0.8)
                self.bn.running_var.uniform_(0.5, 2.0)
                self.bn.weight.uniform_(0.5, 1.5)
                self.bn.bias.uniform_(-0.5, 0.5)
            self.bn.eval()  # frozen statistics (its buffers are still broadcast by DDP)
        self.to(dtype_of(scn))

    def forward(self, x: Tensor, inj: Tensor, side: bool) -> Tensor:
        h = self.sig(self.lin1(x))
        if side:
            self.side(h, inj)
        z = h if self.bn is None else self.bn(h.reshape(-1, HIDDEN)).reshape(h.shape)
        return self.head(z)


def initial_parameters(scn: Scenario) -> dict[str, Tensor]:
    """Named parameters and frozen BatchNorm statistics of the scenario's model, in float64."""
    net = Net(scn)
    out = {n: p.detach().double().clone() for n, p in net.named_parameters()}
    if net.bn is not None:
        out["bn.running_mean"] = net.bn.running_mean.double().clone()
        out["bn.running_var"] = net.bn.running_var.double().clone()
    return out


# --------------------------------------------------------------------------- the float64 reference
def _sums(family: str, args: tuple[float, ...], act: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Sufficient statistics (sums over kept positions) of one record ``act`` [n, T, d], ``mask`` [n, T]."""
    x = act[mask]
    m, d = x.shape
    n = torch.tensor(float(m), dtype=act.dtype)
    if family == "L1":
        return {"a": x.abs().sum(), "n": n}
    if family == "L2":
        return {"q": x.pow(2).sum(), "n": n}
    if family == "AR":
        return {"q": x.pow(2).sum(), "n": n * d}
    if family == "TAR":
        diff = (act[:, 1:] - act[:, :-1])[mask[:, 1:] & mask[:, :-1]]
        return {"q": diff.pow(2).sum(), "n": torch.tensor(float(diff.numel()), dtype=act.dtype)}
    if family == "KLSparsity":
        return {"s": x.sum(0), "n": n}
    if family in ("DeCov", "Covariance"):
        return {"s": x.sum(0), "o": x.T @ x, "n": n}
    if family == "VarianceFloor":
        return {"s": x.sum(0), "q": x.pow(2).sum(0), "n": n}
    if family == "LoadBalance":
        top = torch.topk(x.detach(), int(args[1]), dim=-1).indices
        f = (
            torch.stack([(top == e).sum() for e in range(d)]).to(act.dtype)
            if m
            else torch.zeros(d, dtype=act.dtype)
        )
        if len(args) > 3 and args[3]:  # sigmoid scores normalised over the experts of each token
            # sigma_e / sum_j sigma_j, as a softmax of log-sigmoids: sigmoid underflows to 0 for
            # very negative logits (0 / 0 in float64), its log does not
            probs = torch.softmax(torch.nn.functional.logsigmoid(x), dim=-1)
        else:
            probs = torch.softmax(x, dim=-1)
        return {"f": f, "p": probs.sum(0), "n": n}
    if family == "ZLoss":
        return {"z": torch.logsumexp(x, dim=-1).pow(2).sum(), "n": n}
    raise KeyError(family)


def _value(family: str, args: tuple[float, ...], s: dict[str, Tensor], n_bessel: float) -> Tensor:
    """A penalty of (moving-average) sums ``s``; ``n_bessel`` is the sample size of the unbiased ones."""
    n = s["n"]
    zero = sum(v.sum() for v in s.values()) * 0.0
    if float(n) == 0.0:
        return zero
    if family == "L1":
        return args[0] * s["a"] / n
    if family in ("L2", "AR", "TAR"):
        return args[0] * s["q"] / n
    if family == "KLSparsity":
        p, w = args
        rho = (s["s"] / n).clamp(1e-6, 1 - 1e-6)
        return w * (p * torch.log(p / rho) + (1 - p) * torch.log((1 - p) / (1 - rho))).sum()
    if family in ("DeCov", "Covariance"):
        mu = s["s"] / n
        biased = s["o"] / n - torch.outer(mu, mu)
        off = biased.pow(2).sum() - torch.diagonal(biased).pow(2).sum()
        if family == "DeCov":
            return args[0] * 0.5 * off
        if n_bessel <= 1 + 1e-4:  # (the library's margin: moments.BESSEL_MARGIN)
            return zero
        return args[0] * off * (n_bessel / (n_bessel - 1)) ** 2 / mu.numel()
    if family == "VarianceFloor":
        w, gamma, eps = args
        if n_bessel <= 1 + 1e-4:  # (the library's margin: moments.BESSEL_MARGIN)
            return zero
        var = (s["q"] / n - (s["s"] / n) ** 2) * n_bessel / (n_bessel - 1)
        return w * torch.relu(gamma - torch.sqrt(var + eps)).mean()
    if family == "LoadBalance":
        experts, k, w = args[:3]
        return w * experts * ((s["f"] / (n * k)) * (s["p"] / n)).sum()
    if family == "ZLoss":
        return args[0] * s["z"] / n
    raise KeyError(family)


def _forward(p: dict[str, Tensor], rec: Record, scn: Scenario) -> dict[str, Tensor]:
    """The model in float64 from its formula: the slots' activations and the output ``y``."""
    x = rec.x.double()
    h = torch.sigmoid(x @ p["lin1.weight"].T + p["lin1.bias"])
    out = {"sig": h}
    if rec.side:
        out["side"] = torch.tanh(h) + scn.offset + rec.inj.double()
    z = h
    if scn.bn:
        z = (h - p["bn.running_mean"]) / torch.sqrt(p["bn.running_var"] + 1e-5) * p["bn.weight"] + p[
            "bn.bias"
        ]
    out["head"] = z @ p["head.weight"].T + p["head.bias"]
    return out


def _weight_value(p: dict[str, Tensor], scn: Scenario) -> Tensor:
    import fnmatch

    total = torch.zeros((), dtype=torch.float64)
    for glob, terms in scn.weights.items():
        names = [n for n in p if fnmatch.fnmatchcase(n, glob) and "running" not in n]
        for kind, lam in terms:
            total = total + lam * sum(
                q.pow(2).sum() if kind == "WeightL2" else q.abs().sum() for q in (p[n] for n in names)
            )
    return total


def groups(scn: Scenario) -> list[tuple[list[str], bool]]:
    """The regularizers of a scenario: their slots, and whether they hold the weight penalties."""
    if scn.two_regs:
        return [([s for s in scn.penalties if s != "side"], True), (["side"], False)]
    return [(list(scn.penalties), True)]


def reference(scn: Scenario) -> dict[str, Any]:
    """The scenario in one float64 process: per step the penalty each training rank reports, the
    DDP-averaged gradients, and after the run the parameters, skipped steps and state step count."""
    p = initial_parameters(scn)
    train = [n for n in p if "running" not in n]
    for n in train:
        p[n].requires_grad_(True)
    data = plan(scn)
    w_size = scn.world_size
    ema: dict[tuple[str, int], dict[str, Tensor]] = {}
    committed = [0] * len(groups(scn))
    skipped = [[0] * w_size for _ in groups(scn)]
    momentum: dict[str, Tensor] = {}
    steps: list[dict[str, Any]] = []
    lr = 0.05 if scn.dtype == "float32" else 0.2
    for t in range(scn.steps):
        ranks = [r for r in range(w_size) if data[t][r] is not None]
        acts = {r: _forward(p, data[t][r], scn) for r in ranks}  # type: ignore[arg-type]
        task = sum(TASK * acts[r]["head"].pow(2).sum() for r in ranks) / w_size

        def kept_finite(rs: list[int], slots: list[str], acts: dict = acts, t: int = t) -> bool:
            return all(
                bool(torch.isfinite(acts[r][slot][data[t][r].mask]).all())  # type: ignore[union-attr]
                for r in rs
                for slot in slots
                if slot in acts[r]
            )

        def sums_of(rs: list[int], slot: str, i: int, acts: dict = acts, t: int = t) -> dict[str, Tensor]:
            fam, args = scn.penalties[slot][i]
            parts = [
                _sums(fam, args, acts[r][slot], data[t][r].mask)  # type: ignore[union-attr]
                for r in rs
                if slot in acts[r]
            ]
            if not parts:
                d = SLOT_DIMS[slot]
                parts = [
                    _sums(
                        fam,
                        args,
                        torch.zeros(0, TIME, d, dtype=torch.float64),
                        torch.zeros(0, TIME, dtype=torch.bool),
                    )
                ]
            return {k: sum(q[k] for q in parts) for k in parts[0]}

        if t == scn.checkpoint:  # skipped_steps counts the steps of the regularizer object
            skipped = [[0] * w_size for _ in groups(scn)]
        penalty = torch.zeros((), dtype=torch.float64)
        values: dict[int, Tensor] = dict.fromkeys(ranks, penalty)
        for g, (slots, weighted) in enumerate(groups(scn)):
            # each regularizer decides on its own statistics (global/ema: all training ranks')
            deciders = [ranks] if scn.sync != "local" else [[r] for r in ranks]
            for rs in deciders:
                if not kept_finite(rs, slots):
                    for r in rs if scn.sync == "local" else range(w_size):
                        skipped[g][r] += 1
                    continue
                v = _weight_value(p, scn) if weighted else torch.zeros((), dtype=torch.float64)
                for slot in slots:
                    for i, (fam, args) in enumerate(scn.penalties[slot]):
                        s = sums_of(rs, slot, i)
                        if scn.sync == "ema":
                            old = ema.get((slot, i))
                            s = {
                                k: (0.0 if old is None else scn.decay * old[k]) + (1 - scn.decay) * x
                                for k, x in s.items()
                            }
                            ema[(slot, i)] = {k: x.detach() for k, x in s.items()}
                            nb = float(s["n"]) / (1 - scn.decay ** (committed[g] + 1))
                        else:
                            nb = float(s["n"])
                        v = v + _value(fam, args, s, nb)
                committed[g] += scn.sync == "ema"
                penalty = penalty + (v / w_size if scn.sync == "local" else v)
                for r in rs:
                    values[r] = values[r] + v
        loss = task + penalty
        grads = torch.autograd.grad(loss, [p[n] for n in train], allow_unused=True)
        grads = [torch.zeros_like(p[n]) if g is None else g for n, g in zip(train, grads, strict=True)]
        with torch.no_grad():
            for n, g in zip(train, grads, strict=True):
                if scn.momentum:
                    momentum[n] = g.clone() if n not in momentum else scn.momentum * momentum[n] + g
                    g = momentum[n]
                p[n] -= lr * g
        steps.append(
            {
                "values": {r: float(v.detach()) for r, v in values.items()},
                "grads": [g.numpy().copy() for g in grads],
            }
        )
    return {
        "steps": steps,
        "params": [p[n].detach().numpy().copy() for n in train],
        "skipped": skipped,
        "state_step": [c if scn.sync == "ema" else 0 for c in committed],
        "lr": lr,
    }


# --------------------------------------------------------------------------- one rank
def _build(scn: Scenario, rank: int, net: nn.Module) -> list[Any]:
    """The regularizer(s) of this rank (rank W-1 builds another one in a misuse scenario)."""
    import actreg

    pens = {s: [make_penalty(f, a) for f, a in p] for s, p in scn.penalties.items()}
    weights = {g: [getattr(actreg, k)(lam) for k, lam in terms] for g, terms in scn.weights.items()}
    odd = rank == scn.world_size - 1
    if scn.misuse == "penalty" and odd:
        slot = next(iter(scn.penalties))
        fam, args = scn.penalties[slot][0]
        pens[slot][0] = make_penalty(
            fam,
            (*args[:2], args[2] * 2, *args[3:])  # the weight (E, k, weight, score)
            if fam == "LoadBalance"
            else (args[0] * 2, *args[1:])
            if fam != "KLSparsity"
            else (*args[:-1], args[-1] * 2),
        )
    if scn.misuse == "weights" and odd:
        weights = {g: [getattr(actreg, k)(lam * 2) for k, lam in terms] for g, terms in scn.weights.items()}
    if scn.misuse == "weight-params" and odd:  # as many elements, other parameters
        weights = {"head.weight" if g == "lin1.weight" else g: v for g, v in weights.items()}
    kw: dict[str, Any] = {"sync": scn.sync, "decay": scn.decay, "nonfinite": scn.nonfinite}
    kw["fused"] = scn.fused
    if scn.two_regs:
        first = {s: v for s, v in pens.items() if s != "side"}
        return [
            actreg.ActivityRegularizer(net, first, weights=weights or None, **kw),
            actreg.ActivityRegularizer(net, {"side": pens["side"]}, **kw),
        ]
    return [actreg.ActivityRegularizer(net, pens, weights=weights or None, **kw)]


def _fresh(scn: Scenario, rank: int, lr: float, seed_shift: int = 0) -> tuple[nn.Module, Any, Any, list[Any]]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = Net(dataclasses.replace(scn, data_seed=scn.data_seed + seed_shift))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.13: "use forward_sync_buffers"
        net = DDP(model, broadcast_buffers=scn.broadcast_buffers)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=scn.momentum)
    return model, net, opt, _build(scn, rank, net)


def _state_arrays(state: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(state, dict):
        out: dict[str, Any] = {}
        for k, v in state.items():
            out.update(_state_arrays(v, f"{prefix}/{k}"))
        return out
    if isinstance(state, Tensor):
        return {prefix: state.detach().cpu().numpy().copy()}
    return {prefix: state}


def _train(rank: int, scn: Scenario, lr: float, log: list[dict[str, Any]]) -> dict[str, Any]:
    from torch.distributed.algorithms.join import Join

    data = plan(scn)
    model, net, opt, regs = _fresh(scn, rank, lr)
    mine = scn.batches[rank]
    cut = scn.checkpoint if scn.checkpoint is not None else mine
    phases = [(0, min(cut, mine)), (min(cut, mine), mine)] if scn.checkpoint is not None else [(0, mine)]
    for phase, (lo, hi) in enumerate(phases):
        if phase == 1:  # save everything, load it into fresh objects (other initial parameters)
            buf = io.BytesIO()
            torch.save(
                {
                    "model": model.state_dict(),
                    "opt": opt.state_dict(),
                    "regs": [r.state_dict() for r in regs],
                },
                buf,
            )
            buf.seek(0)
            saved = torch.load(buf, weights_only=True)
            for r in regs:
                r.remove()
            model, net, opt, regs = _fresh(scn, rank, lr, seed_shift=7919)
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
            for r, sd in zip(regs, saved["regs"], strict=True):
                r.load_state_dict(sd)
        ctx = Join([net, *regs]) if scn.join else contextlib.nullcontext()
        with ctx:
            for t in range(lo, hi):
                rec = data[t][rank]
                assert rec is not None
                opt.zero_grad()
                with contextlib.ExitStack() as stack:
                    for r in regs:
                        stack.enter_context(r.mask(rec.mask))
                    y = net(rec.x, rec.inj, rec.side)
                order = regs if scn.two_regs != "reversed" else regs[::-1]
                values = [r.loss() for r in order]
                penalty = sum(values)
                (TASK * y.pow(2).sum() + penalty).backward()
                grads = [q.grad.detach().double().numpy().copy() for q in model.parameters()]
                opt.step()
                log.append(
                    {
                        "step": t,
                        "value": float(penalty.detach()),
                        "total": sum(r.metrics()["total"] for r in regs),
                        "grads": grads,
                    }
                )
    for r in regs:
        r.check()
    metrics = [r.metrics() for r in regs]
    states = [r.state_dict() for r in regs]
    return {
        "params": [q.detach().double().numpy().copy() for q in model.parameters()],
        "skipped": [m.get("skipped_steps") for m in metrics],
        "state_step": [s["step"] for s in states],
        "states": [_state_arrays(s) for s in states],
    }


def run_rank(rank: int, world_size: int, scn: Scenario, stack_dir: str, deadline: float) -> dict[str, Any]:
    """Run ``scn`` on this rank (a ``WorkerPool`` task). Returns the per-step log and the end
    state, or the documented error this rank raised (``{"error": type name, ...}``). Arms a
    traceback dump of every thread into ``stack_dir/rank<r>.txt`` after ``deadline`` seconds."""
    import actreg

    torch.set_num_threads(1)
    lr = 0.05 if scn.dtype == "float32" else 0.2
    log: list[dict[str, Any]] = []
    path = os.path.join(stack_dir, f"rank{rank}.txt")
    with open(path, "w") as stacks:
        faulthandler.dump_traceback_later(deadline, exit=False, file=stacks)
        try:
            out = _train(rank, scn, lr, log)
        except (actreg.LayoutMismatchError, actreg.NonFiniteStatisticError, actreg.RecordingError) as err:
            out = {"error": type(err).__name__, "message": str(err)[:500], "at": len(log)}
        except BaseException as err:
            _status(stack_dir, rank, f"raised {type(err).__name__}: {str(err)[:300]} after {len(log)} steps")
            raise
        finally:
            faulthandler.cancel_dump_traceback_later()
    _status(
        stack_dir, rank, f"finished after {len(log)} steps" + (f", {out['error']}" if "error" in out else "")
    )
    out["log"] = log
    return out


def _status(stack_dir: str, rank: int, text: str) -> None:
    """How this rank left the scenario (read when another rank hung)."""
    with open(os.path.join(stack_dir, f"rank{rank}.status"), "w") as f:
        f.write(text)


# --------------------------------------------------------------------------- comparison
def _close(got: Any, want: Any, f32: bool) -> bool:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return False
    if f32:
        scale = max(1.0, float(np.abs(want).max(initial=0.0)))
        return bool(np.allclose(got, want, rtol=2e-2, atol=2e-2 * scale, equal_nan=False))
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    return bool(np.allclose(got, want, rtol=1e-6, atol=1e-9 * scale, equal_nan=False))


def check(scn: Scenario, ref: dict[str, Any], results: list[Any]) -> list[str]:
    """Problems (empty: the scenario passed) of the ranks' ``results`` against the reference."""
    from _pool import RemoteError

    problems: list[str] = []
    f32 = scn.dtype == "float32"
    crashed = [r for r in results if isinstance(r, RemoteError)]
    for e in crashed:
        where = [ln.strip() for ln in e.traceback.splitlines() if ln.strip().startswith("File")][-1:]
        first = e.message.splitlines()[0][:300] if e.message else ""
        problems.append(f"rank {e.rank} raised {e.type_name}: {first} ({' '.join(where)})")
    if crashed:
        return problems
    expect = scn.expect
    if expect is not None:
        for rank, got in enumerate(results):
            if got.get("error") != expect:
                problems.append(f"rank {rank}: expected {expect}, got {got.get('error') or 'no error'}")
        return problems
    for rank, got in enumerate(results):
        if "error" in got:
            problems.append(f"rank {rank} raised {got['error']} at step {got['at']}: {got['message'][:300]}")
    if problems:
        return problems
    for rank, got in enumerate(results):
        if len(got["log"]) != scn.batches[rank]:
            problems.append(f"rank {rank}: {len(got['log'])} steps logged, expected {scn.batches[rank]}")
            continue
        for entry in got["log"]:
            t = entry["step"]
            want = ref["steps"][t]
            if not _close(entry["value"], want["values"][rank], f32):
                problems.append(
                    f"rank {rank} step {t}: loss() {entry['value']!r} != reference {want['values'][rank]!r}"
                )
            if not _close(entry["total"], want["values"][rank], f32):
                problems.append(
                    f"rank {rank} step {t}: metrics total {entry['total']!r} != {want['values'][rank]!r}"
                )
            for i, (g, w) in enumerate(zip(entry["grads"], want["grads"], strict=True)):
                if not np.isfinite(g).all():
                    problems.append(f"rank {rank} step {t}: non-finite gradient of parameter {i}")
                elif not _close(g, w, f32):
                    err = float(np.abs(g - w).max())
                    problems.append(f"rank {rank} step {t}: gradient of parameter {i} off by {err:.3g}")
        for i, (q, w) in enumerate(zip(got["params"], ref["params"], strict=True)):
            if not _close(q, w, f32):
                problems.append(f"rank {rank}: final parameter {i} off by {float(np.abs(q - w).max()):.3g}")
        if scn.nonfinite == "skip":
            want_skipped: list[float | None] = [float(per_rank[rank]) for per_rank in ref["skipped"]]
            if scn.checkpoint == scn.steps:  # the loaded regularizers never stepped: no metrics
                want_skipped = [None] * len(want_skipped)
            if got["skipped"] != want_skipped:
                problems.append(f"rank {rank}: skipped_steps {got['skipped']} != {want_skipped}")
        if got["state_step"] != ref["state_step"]:
            problems.append(f"rank {rank}: state step {got['state_step']} != {ref['state_step']}")
        if scn.sync != "local" and rank > 0:
            for i, (a, b) in enumerate(zip(got["states"], results[0]["states"], strict=True)):
                if a.keys() != b.keys():
                    problems.append(f"rank {rank}: state_dict keys of regularizer {i} differ from rank 0's")
                    continue
                for k in a:
                    same = np.array_equal(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k]
                    if not same:
                        problems.append(
                            f"rank {rank}: state_dict {k} of regularizer {i} differs from rank 0's"
                        )
    return _dedupe(problems)


def _dedupe(problems: list[str], keep: int = 12) -> list[str]:
    seen: list[str] = []
    for p in problems:
        if p not in seen:
            seen.append(p)
    return seen if len(seen) <= keep else [*seen[:keep], f"... and {len(seen) - keep} more"]


# --------------------------------------------------------------------------- classification
def classify(scn: Scenario, problems: list[str], hung: bool) -> list[str]:
    """The known defects (keys of :data:`KNOWN`, or of :data:`FOUND` for those the soak found) that
    could explain the failure: those whose features the scenario has (:func:`reaches`) and whose
    symptom it shows; ``["NEW"]`` if none."""
    text = "\n".join(problems)
    if "more than one element of the written-to tensor" in text and _duplicate_family(scn):
        return ["NEW:duplicate-penalty"]
    if "hang" not in text and " raised " not in text and scn.dtype == "float64" and _late_first(scn):
        small = [float(m) for m in re.findall(r"off by ([0-9.e+-]+)", text)]
        if small and max(small) < 1e-5 and "reference" not in text:
            return ["NEW:late-dtype"]
    if not hung and scn.sync == "ema" and _unrecorded_after_load(scn):
        return ["NEW:ema-load-unrecorded"]
    candidates = reaches(scn)
    symptoms = {
        "join-0/1-batches": hung or " raised " in text,
        "join-buffers": hung or " raised " in text,
        "two-regs-order": hung or " raised " in text,
        "weights-per-rank": "expected LayoutMismatchError" in text,
        "skipped-steps": "skipped_steps" in text,
        "nan-grad": "non-finite gradient" in text or "expected NonFiniteStatisticError" in text,
        "centred-late-shift": "reference" in text or "gradient" in text or "parameter" in text,
        "centred-first-nonfinite": not hung,  # "breaks later steps": any symptom (a NaN shift, ...)
        # (and, before its fix, the weight penalties' gradient scaled by the share of ranks training)
        "weights-join-stale": "metrics total" in text or "gradient" in text or "parameter" in text,
    }
    return [k for k in KNOWN if k in candidates and symptoms[k]] or ["NEW"]


def _late_first(scn: Scenario) -> bool:
    """Some regularizer records nothing in its first step: all its slots are ``side``, which starts late."""
    if not any(slots == ["side"] for slots, _ in groups(scn)):
        return False
    starts = [0] if scn.checkpoint is None else [0, scn.checkpoint]  # a loaded regularizer starts again
    on = [any(scn.side[t][r] and scn.batches[r] > t for r in range(scn.world_size)) for t in range(scn.steps)]
    return any(c < scn.steps and not on[c] and any(on[c:]) for c in starts)


def _unrecorded_after_load(scn: Scenario) -> bool:
    """A slot records nothing (on any rank) in the first step after the checkpoint."""
    c = scn.checkpoint
    if c is None or c >= scn.steps or "side" not in scn.penalties:
        return False
    return not any(scn.side[c][r] and scn.batches[r] > c for r in range(scn.world_size))


def _duplicate_family(scn: Scenario) -> bool:
    return any(len({f for f, _ in p}) < len(p) for p in scn.penalties.values())


def reaches(scn: Scenario) -> set[str]:
    """The known defects whose combination of features ``scn`` has (it could have found them)."""
    out: set[str] = set()
    uneven = scn.join and len(set(scn.batches)) > 1
    if uneven and min(scn.batches) <= 1:
        out.add("join-0/1-batches")
    if uneven and scn.bn and scn.broadcast_buffers:
        out.add("join-buffers")
    side = {f for f, _ in scn.penalties.get("side", [])}
    first = scn.side_first()
    if side & CENTRED and scn.dtype == "float32" and first is not None and (first > 0 or first in scn.masked):
        out.add("centred-late-shift")
    hits = injected(scn) if scn.inject else []
    if side & CENTRED and any(t == first for t, _ in hits):
        out.add("centred-first-nonfinite")
    if scn.nonfinite == "skip" and len({t for t, _ in hits}) >= 2:
        out.add("skipped-steps")
    if hits and side & {"L2", "DeCov", "VarianceFloor", "ZLoss", "LoadBalance", "TAR"}:
        out.add("nan-grad")
    if uneven and scn.weights:
        out.add("weights-join-stale")
    if scn.misuse in ("weights", "weight-params"):
        out.add("weights-per-rank")
    if scn.join and scn.two_regs == "reversed":
        out.add("two-regs-order")
    return out


# --------------------------------------------------------------------------- driving
@dataclass
class Outcome:
    """What one scenario did."""

    scenario: Scenario
    problems: list[str]
    hung: bool = False
    stacks: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def classes(self) -> list[str]:
        return classify(self.scenario, self.problems, self.hung)

    def report(self) -> str:
        """The failure as text: the scenario, the problems, and every rank's stack of a hang."""
        lines = [
            f"seed {self.scenario.seed}: {self.scenario.describe()}",
            f"  classes: {', '.join(self.classes)}",
        ]
        lines += [f"  {p}" for p in self.problems]
        lines.append(f"  repro: {repro(self.scenario)}")
        for rank, text in sorted(self.stacks.items()):
            lines.append(f"  --- rank {rank} stack ---")
            lines += [f"  {line}" for line in text.strip().splitlines()[:60]]
        return "\n".join(lines)


def repro(scn: Scenario) -> str:
    """The command line that reruns ``scn`` alone."""
    text = scenario_repr(scn)
    if scn.data_seed == scn.seed and text == scenario_repr(Scenario.draw(scn.seed)):
        return f"python tests/soak.py --seed {scn.seed} -v"
    return f"python tests/soak.py --scenario {shlex.quote(text)} -v"


def scenario_repr(scn: Scenario) -> str:
    """``scn`` as JSON (NaN and infinities spelled as JSON's extension does), for ``--scenario``."""
    return json.dumps(dataclasses.asdict(scn))


def scenario_from(text: str) -> Scenario:
    """The scenario of :func:`scenario_repr`'s text."""
    fields = json.loads(text)
    fields["batches"] = tuple(fields["batches"])
    fields["side"] = tuple(tuple(s) for s in fields["side"])
    fields["masked"] = tuple(fields["masked"])
    fields["rows"] = tuple(fields["rows"])
    fields["inject"] = tuple(tuple(i) for i in fields["inject"])
    fields["penalties"] = {k: [(f, tuple(a)) for f, a in v] for k, v in fields["penalties"].items()}
    fields["weights"] = {k: [tuple(x) for x in v] for k, v in fields["weights"].items()}
    return Scenario(**fields)


def _ready(rank: int, world_size: int) -> int:
    return rank


def run_scenario(pools: Any, scn: Scenario, deadline: float = 30.0) -> Outcome:
    """Run ``scn`` on the pool of its world size and compare it with the reference."""
    t0 = time.monotonic()
    ref = reference(scn)
    pool = pools[scn.world_size]
    pool.run(_ready, timeout=180.0)  # (re)start the pool first: its start-up is not the scenario's time
    with tempfile.TemporaryDirectory(prefix=f"soak-{scn.seed}-") as stack_dir:
        try:
            results = pool.run(run_rank, scn, stack_dir, deadline, timeout=deadline + 8, expect_errors=True)
        except TimeoutError as err:
            stacks = {}
            problems = [f"hang: {err}"]
            for r in range(scn.world_size):
                text = "(no stack: the rank never started the scenario)"
                with contextlib.suppress(OSError):
                    with open(os.path.join(stack_dir, f"rank{r}.txt")) as f:
                        text = f.read() or "(no stack dumped)"
                status = "still running (hung)"
                with contextlib.suppress(OSError):
                    with open(os.path.join(stack_dir, f"rank{r}.status")) as f:
                        status = f.read()
                stacks[r] = text
                problems.append(f"rank {r}: {status}")
            return Outcome(scn, problems, hung=True, stacks=stacks, seconds=time.monotonic() - t0)
    problems = check(scn, ref, results)
    if problems or any(not isinstance(r, dict) or "error" in r for r in results):
        # an error (documented or not) may leave a collective unpaired, e.g. DDP's under Join:
        # the next scenario starts on fresh processes
        pool.close()
    return Outcome(scn, problems, seconds=time.monotonic() - t0)


SIMPLER = (
    ("misuse", None),
    ("two_regs", None),
    ("checkpoint", None),
    ("bn", False),
    ("weights", {}),
    ("momentum", 0.0),
    ("masked", ()),
    ("keep", 1.0),
    ("inject", ()),
    ("join", False),
)


def shrink(pools: Any, outcome: Outcome, deadline: float = 30.0, budget: int = 40) -> Outcome:
    """A smaller scenario with the same classes of failure: drop one feature at a time, keep it
    dropped while the scenario still fails the same way."""
    best = outcome
    tries = 0

    def attempt(candidate: Scenario) -> bool:
        nonlocal best, tries
        if tries >= budget:
            return False
        tries += 1
        got = run_scenario(pools, candidate, deadline)
        if (
            not got.ok
            and got.hung == best.hung
            and set(got.classes) <= set(best.classes) | {"NEW"}
            and (("NEW" in got.classes) == ("NEW" in best.classes))
        ):
            best = got
            return True
        return False

    for name, value in SIMPLER:
        scn = best.scenario
        if getattr(scn, name) == value:
            continue
        cand = dataclasses.replace(scn, **{name: value})
        if name == "join" and len(set(scn.batches)) > 1:
            continue
        attempt(cand)
    scn = best.scenario
    for slot in list(scn.penalties):  # fewer penalties
        pens = dict(best.scenario.penalties)
        pens.pop(slot)
        if pens and not (slot == "side" and best.scenario.two_regs):
            attempt(dataclasses.replace(best.scenario, penalties=pens))
    for slot in list(best.scenario.penalties):
        while len(best.scenario.penalties.get(slot, [])) > 1:
            pens = {k: list(v) for k, v in best.scenario.penalties.items()}
            pens[slot] = pens[slot][1:]
            if not attempt(dataclasses.replace(best.scenario, penalties=pens)):
                pens[slot] = best.scenario.penalties[slot][:1]
                if not attempt(dataclasses.replace(best.scenario, penalties=pens)):
                    break
    return best


class _Pools:
    """Pools by world size, outside pytest."""

    def __init__(self) -> None:
        from _pool import WorkerPool

        self._make = WorkerPool
        self._pools: dict[int, Any] = {}

    def __getitem__(self, w: int) -> Any:
        if w not in self._pools:
            self._pools[w] = self._make(w)
        return self._pools[w]

    def close(self) -> None:
        for p in self._pools.values():
            p.close()


def avoiding(scn: Scenario, avoid: Iterable[str]) -> Scenario:
    """``scn`` without the combination of a defect already found (a name of :data:`FOUND` without
    ``NEW:``), so that a long run looks for others: ``duplicate-penalty`` keeps one penalty of
    each family per slot."""
    avoid = set(avoid)
    if "duplicate-penalty" in avoid and _duplicate_family(scn):
        pens = {}
        for slot, p in scn.penalties.items():
            families: dict[str, tuple[str, tuple[float, ...]]] = {}
            for fam, args in p:
                families.setdefault(fam, (fam, args))
            pens[slot] = list(families.values())
        scn = dataclasses.replace(scn, penalties=pens)
    return scn


def soak(
    pools: Any,
    minutes: float,
    start: int,
    out: Any = sys.stdout,
    deadline: float = 30.0,
    avoid: Iterable[str] = (),
) -> list[Outcome]:
    """Run seeds ``start, start+1, ...`` for ``minutes``; print progress and a summary.

    ``avoid``: defects found already whose combination the scenarios leave out (:func:`avoiding`).
    Returns the failures."""
    stop = time.monotonic() + 60 * minutes
    failures: list[Outcome] = []
    count = 0
    seed = start
    while time.monotonic() < stop:
        outcome = run_scenario(pools, avoiding(Scenario.draw(seed), avoid), deadline)
        count += 1
        if not outcome.ok:
            failures.append(outcome)
            print(outcome.report(), file=out, flush=True)
        elif count % 25 == 0:
            print(f"... {count} scenarios, {len(failures)} failed", file=out, flush=True)
        seed += 1
    print(summary(count, failures, start, seed - 1), file=out, flush=True)
    return failures


def summary(count: int, failures: list[Outcome], first: int, last: int) -> str:
    by_class: dict[str, list[int]] = {}
    for f in failures:
        for c in f.classes:
            by_class.setdefault(c, []).append(f.scenario.seed)
    lines = [f"soak: {count} scenarios (seeds {first}..{last}), {len(failures)} failed"]
    for c, seeds in sorted(by_class.items()):
        text = KNOWN.get(c) or FOUND.get(c) or "not a known defect"
        lines.append(f"  {c} ({text}): {len(seeds)} -- seeds {seeds[:20]}")
    for f in failures:
        lines.append(
            f"  seed {f.scenario.seed} [{', '.join(f.classes)}]: {repro(f.scenario)}  # {f.problems[0][:120]}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--minutes M`` (the long mode), ``--seed S`` (one scenario), ``--shrink``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=None)
    parser.add_argument("--start", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--scenario", default=None, help="a scenario as printed by a shrunk repro")
    parser.add_argument("--shrink", action="store_true")
    parser.add_argument("--deadline", type=float, default=30.0)
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument(
        "--avoid",
        action="append",
        default=[a for a in os.environ.get("ACTREG_SOAK_AVOID", "").split(",") if a],
        help="leave out a defect found already (duplicate-penalty); env ACTREG_SOAK_AVOID=a,b",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    pools = _Pools()
    try:
        if args.seed is not None or args.scenario is not None:
            if args.scenario is not None:
                scn = scenario_from(args.scenario)
            else:
                scn = Scenario.draw(args.seed)
            if args.verbose:
                print(scn.describe())
            outcome = run_scenario(pools, scn, args.deadline)
            if outcome.ok:
                print(f"seed {scn.seed}: ok ({outcome.seconds:.1f} s)")
                return 0
            print(outcome.report())
            if args.shrink:
                small = shrink(pools, outcome, args.deadline)
                print("shrunk:")
                print(small.report())
                print(f"  scenario: {scenario_repr(small.scenario)}")
            return 1
        minutes = (
            args.minutes if args.minutes is not None else float(os.environ.get("ACTREG_SOAK_MINUTES", "1"))
        )
        start = args.start if args.start is not None else int(time.time()) % 1_000_000 * 1000
        failures = soak(pools, minutes, start, deadline=args.deadline, avoid=args.avoid)
        return 1 if failures else 0
    finally:
        pools.close()


@contextlib.contextmanager
def _on_path() -> Iterator[None]:
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    yield


if __name__ == "__main__":
    with _on_path():
        import soak  # the pool's workers import the tasks by module name: not "__main__"

        sys.exit(soak.main())
