"""Settings of the demo training: a dataclass, a TOML file, and the ``--penalty`` mini-language.

Precedence: built-in defaults < ``--scenario NAME`` (a named preset, :mod:`actreg.demo.scenarios`) <
``--config FILE`` (TOML) < command-line options.

``--penalty PATTERN=NAME:ARG[:ARG...]`` (repeatable) attaches the penalty ``NAME`` (an ``actreg``
penalty class, case-insensitive) to the modules matching the glob ``PATTERN``. ``ARG`` are the
constructor's arguments in order, or ``key=value``:

    act1=L1:1e-3                  ->  {"act1": [actreg.L1(1e-3)]}
    act2=VarianceFloor:0.1:gamma=0.5
    act*=KLSparsity:0.05:1e-2     ->  KLSparsity(target=0.05, weight=1e-2)

The TOML file uses the same names as the options (``batch_size`` for ``--batch-size``) at top
level, and a ``[penalties]`` table of ``pattern = "SPEC"`` or ``pattern = ["SPEC", ...]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import actreg
from actreg import Penalty
from actreg.modes import SYNC_MODES

from .scenarios import DEFAULT_SCENARIO, get_scenario, scenario_names

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

#: Penalty classes available to ``--penalty`` (lower-case name -> class).
PENALTY_CLASSES: dict[str, type[Penalty]] = {
    cls.__name__.lower(): cls
    for cls in (
        actreg.L1,
        actreg.L2,
        actreg.AR,
        actreg.TAR,
        actreg.KLSparsity,
        actreg.DeCov,
        actreg.VarianceFloor,
        actreg.Covariance,
        actreg.LoadBalance,
        actreg.ZLoss,
    )
}

#: ``--sync`` choices: the three modes of :class:`actreg.ActivityRegularizer`, and ``none`` (no
#: penalty in the loss; the penalties are still measured, for comparison).
SYNC_CHOICES = ("none", *SYNC_MODES)  # "none": train without actreg
BACKEND_CHOICES = ("auto", "gloo", "nccl")
#: Samples in scikit-learn's digits; ``load_digits_split`` holds out ``max(1, ceil(test_fraction * 1797))``.
DIGITS_SAMPLES = 1797
#: ``--seed``: the integers ``torch.manual_seed`` takes, -2**63 to 2**64 - 1 (it reduces them modulo
#: 2**64). The per-epoch seeds derived from it are reduced the same way (``data.epoch_order``).
SEED_RANGE = (-(2**63), 2**64 - 1)


def default_penalties() -> dict[str, list[str]]:
    """The demo's default penalties: sparse first hidden layer, decorrelated second one."""
    return {"act1": ["L1:2e-3"], "act2": ["L1:1e-3", "DeCov:2e-2"]}


@dataclass
class TrainConfig:
    """Everything a demo training run depends on (see ``docs/cli.md``).

    ``scenario`` names the preset whose defaults the other fields started from (it is recorded in
    reports and checkpoints; the fields hold the values actually used).
    """

    scenario: str = DEFAULT_SCENARIO
    nproc: int = 2
    sync: str = "global"
    penalties: dict[str, list[str]] = field(default_factory=default_penalties)
    epochs: int = 12
    batch_size: int = 64
    seed: int = 0
    lr: float = 3e-3
    decay: float = 0.95
    hidden: list[int] = field(default_factory=lambda: [128, 64])
    test_fraction: float = 0.2
    out: str = "runs/train"
    resume: bool = False
    overwrite: bool = False
    keep: int = 3
    backend: str = "auto"
    plots: bool = True
    progress: bool = True
    tensorboard: bool = False

    def validate(self) -> TrainConfig:
        """Raise ``ValueError`` on an inconsistent setting; return ``self``."""
        get_scenario(self.scenario)  # an unknown name lists the choices
        if self.nproc < 1:
            raise ValueError(f"nproc must be >= 1, got {self.nproc}")
        if self.sync not in SYNC_CHOICES:
            raise ValueError(f"sync must be one of {SYNC_CHOICES}, got {self.sync!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(
                f"--seed {self.seed} is outside torch's seed range [-2**63, 2**64 - 1] = "
                f"[{SEED_RANGE[0]}, {SEED_RANGE[1]}]; give a seed in it, e.g. --seed 0"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {self.decay}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must lie in (0, 1), got {self.test_fraction}")
        n_train = DIGITS_SAMPLES - max(1, math.ceil(self.test_fraction * DIGITS_SAMPLES))
        if n_train < 2:
            raise ValueError(
                f"test_fraction {self.test_fraction} leaves {n_train} of the {DIGITS_SAMPLES} digits for "
                "training (at least 2 are needed to standardize the data); use e.g. 0.2"
            )
        if self.keep < 1:
            raise ValueError(f"keep must be >= 1 (checkpoints kept), got {self.keep}")
        if self.resume and self.overwrite:
            raise ValueError(
                "--resume and --overwrite exclude each other: --resume continues the run in --out, "
                "--overwrite replaces it"
            )
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden must be a non-empty list of positive sizes, got {self.hidden}")
        if self.backend not in BACKEND_CHOICES:
            raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {self.backend!r}")
        if not self.penalties:
            raise ValueError("no penalties: give at least one --penalty PATTERN=NAME:WEIGHT")
        build_penalties(self.penalties)  # parse errors surface here, before any worker starts
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (stored in checkpoints and ``report.md``)."""
        return dataclasses.asdict(self)

    def to_argv(self, *, include_nproc: bool = False) -> list[str]:
        """Command-line options that reproduce this configuration in a worker (or ``torchrun``)."""
        argv = [
            "--sync", self.sync,
            "--epochs", str(self.epochs),
            "--batch-size", str(self.batch_size),
            "--seed", str(self.seed),
            "--lr", repr(self.lr),
            "--decay", repr(self.decay),
            "--hidden", ",".join(str(h) for h in self.hidden),
            "--test-fraction", repr(self.test_fraction),
            "--out", self.out,
            "--keep", str(self.keep),
            "--backend", self.backend,
        ]  # fmt: skip
        if self.scenario != DEFAULT_SCENARIO:
            argv = ["--scenario", self.scenario, *argv]  # every setting follows explicitly: it wins
        if include_nproc:
            argv = ["--nproc", str(self.nproc), *argv]
        for pattern, specs in self.penalties.items():
            for spec in specs:
                argv += ["--penalty", f"{pattern}={spec}"]
        if self.resume:
            argv.append("--resume")
        if self.overwrite:
            argv.append("--overwrite")
        if self.tensorboard:
            argv.append("--tensorboard")
        if not self.plots:
            argv.append("--no-plots")
        if not self.progress:
            argv.append("--no-progress")
        return argv


# ---------------------------------------------------------------------- penalties
_INT = re.compile(r"^[+-]?\d+$")


def _number(text: str, where: str) -> int | float:
    text = text.strip()
    if _INT.match(text):
        return int(text)
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{where}: {text!r} is not a finite number")
    return value


def parse_hidden(text: str) -> list[int]:
    """``"128,64"`` -> ``[128, 64]`` (``--hidden``, or ``hidden = "128,64"`` in the TOML file).

    Anything but comma-separated integers is a ``ValueError`` naming ``--hidden``; the sizes are
    checked to be positive by ``TrainConfig.validate``.
    """
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts or not all(_INT.match(part) for part in parts):
        raise ValueError(
            f"--hidden {text!r}: expected the hidden layer sizes as comma-separated positive integers, "
            "e.g. --hidden 128,64"
        )
    return [int(part) for part in parts]


def positive_finite(text: str) -> float:
    """``argparse`` type of a finite number > 0 (e.g. ``actreg verify --tol``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _parse_spec(spec: str) -> tuple[type[Penalty], inspect.BoundArguments]:
    """The class of ``NAME:ARG[:ARG...]`` and its arguments, bound to the constructor's signature."""
    name, *raw = spec.strip().split(":")
    cls = PENALTY_CLASSES.get(name.strip().lower())
    if cls is None:
        known = ", ".join(c.__name__ for c in PENALTY_CLASSES.values())
        raise ValueError(f"penalty spec {spec!r}: unknown penalty {name!r}; known: {known}")
    args: list[int | float] = []
    kwargs: dict[str, int | float] = {}
    for item in raw:
        if "=" in item:
            key, value = item.split("=", 1)
            kwargs[key.strip()] = _number(value, f"penalty spec {spec!r}")
        elif kwargs:
            raise ValueError(f"penalty spec {spec!r}: positional argument after key=value")
        else:
            args.append(_number(item, f"penalty spec {spec!r}"))
    signature = inspect.signature(cls)
    try:
        return cls, signature.bind(*args, **kwargs)
    except TypeError as err:
        raise ValueError(f"penalty spec {spec!r}: {err}; {cls.__name__}{signature}") from None


def parse_penalty(spec: str) -> Penalty:
    """One penalty from ``NAME:ARG[:ARG...]`` (``ARG`` positional or ``key=value``)."""
    cls, bound = _parse_spec(spec)
    try:
        return cls(*bound.args, **bound.kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"penalty spec {spec!r}: {err}") from None


def canonical_penalties(specs: Mapping[str, Sequence[str]]) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """``{pattern: [(class name, all constructor arguments)]}``: equal for equal values however spelled.

    ``L1:2e-3`` and ``l1:0.002`` give the same; so do ``VarianceFloor:1`` and ``VarianceFloor:1:gamma=1``.
    """
    out: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for pattern, items in specs.items():
        out[pattern] = []
        for spec in items:
            cls, bound = _parse_spec(spec)
            bound.apply_defaults()
            out[pattern].append((cls.__name__, dict(bound.arguments)))
    return out


def parse_penalty_option(option: str) -> tuple[str, str]:
    """Split ``PATTERN=NAME:ARGS`` into ``(pattern, spec)`` and check the spec parses."""
    if "=" not in option:
        raise ValueError(f"--penalty {option!r}: expected PATTERN=NAME:WEIGHT[:...], e.g. 'act1=L1:1e-3'")
    pattern, spec = option.split("=", 1)
    pattern, spec = pattern.strip(), spec.strip()
    if not pattern:
        raise ValueError(f"--penalty {option!r}: empty module pattern")
    parse_penalty(spec)
    return pattern, spec


def penalties_from_options(options: Sequence[str]) -> dict[str, list[str]]:
    """``["act1=L1:1e-3", "act1=DeCov:1e-2"]`` -> ``{"act1": ["L1:1e-3", "DeCov:1e-2"]}``."""
    out: dict[str, list[str]] = {}
    for option in options:
        pattern, spec = parse_penalty_option(option)
        out.setdefault(pattern, []).append(spec)
    return out


def build_penalties(specs: Mapping[str, Sequence[str]]) -> dict[str, list[Penalty]]:
    """Fresh penalty objects for ``ActivityRegularizer`` from ``{pattern: [spec, ...]}``."""
    return {pattern: [parse_penalty(s) for s in items] for pattern, items in specs.items()}


# ---------------------------------------------------------------------- TOML
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _coerce(name: str, value: Any) -> Any:
    """Check/convert one TOML or CLI value for field ``name``."""
    default = getattr(TrainConfig(), name)
    if name == "penalties":
        if not isinstance(value, Mapping):
            raise ValueError("[penalties] must be a table of pattern = 'SPEC' or ['SPEC', ...]")
        table: dict[str, list[str]] = {}
        for pattern, specs in value.items():
            items = [specs] if isinstance(specs, str) else specs
            if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
                raise ValueError(f"[penalties] {pattern!r}: expected a string or a list of strings")
            for s in items:
                parse_penalty(s)
            table[str(pattern)] = list(items)
        return table
    if name == "hidden":
        if isinstance(value, str):
            value = parse_hidden(value)
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise ValueError(f"hidden must be a list of integers, got {value!r}")
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    return value


def load_toml(path: str | Path) -> dict[str, Any]:
    """Settings from a TOML file (validated field names and types; not merged with defaults)."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as err:
        raise ValueError(f"--config {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:  # tomllib decodes the bytes as UTF-8 first
        raise ValueError(
            f"--config {path}: not UTF-8 text ({err.reason}: byte 0x{err.object[err.start]:02x} at offset "
            f"{err.start}); TOML files must be UTF-8: save the file as UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"--config {path}: invalid TOML: {err}") from None
    settings: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in _FIELDS:
            raise ValueError(f"--config {path}: unknown setting {key!r}; known: {sorted(_FIELDS)}")
        try:
            settings[name] = _coerce(name, value)
        except ValueError as err:
            raise ValueError(f"--config {path}: {err}") from None
    return settings


# ---------------------------------------------------------------------- argparse
def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by ``actreg train``, ``actreg compare`` and the torchrun workers.

    Every default is ``None`` so that :func:`config_from_args` can tell what was given.
    """
    d = TrainConfig()
    g = parser.add_argument_group("training")
    g.add_argument("--config", metavar="FILE", help="TOML file with the same settings (CLI wins)")
    g.add_argument(
        "--scenario",
        choices=scenario_names(),
        help=f"preset of the defaults of the options below, which still win, as --config does (default "
        f"{DEFAULT_SCENARIO}: the built-in defaults); vicreg: VICReg terms with 2 samples per rank, where "
        "per-rank penalties train a different model (see docs/cli.md)",
    )
    g.add_argument("--nproc", type=int, metavar="W", help=f"worker processes (default {d.nproc})")
    g.add_argument("--sync", choices=SYNC_CHOICES, help=f"regularizer sync mode (default {d.sync})")
    g.add_argument(
        "--penalty",
        action="append",
        metavar="PATTERN=NAME:ARG[:...]",
        help="penalty on modules matching PATTERN, repeatable, e.g. act1=L1:1e-3 act2=DeCov:1e-2 "
        f"(default: {' '.join(f'{p}={s}' for p, ss in d.penalties.items() for s in ss)})",
    )
    g.add_argument("--epochs", type=int, help=f"epochs (default {d.epochs})")
    g.add_argument(
        "--batch-size", type=int, help=f"global batch size, split over ranks (default {d.batch_size})"
    )
    g.add_argument("--seed", type=int, help=f"seed of data split, init and order (default {d.seed})")
    g.add_argument("--lr", type=float, help=f"Adam learning rate (default {d.lr})")
    g.add_argument("--decay", type=float, help=f"EMA decay for --sync ema (default {d.decay})")
    g.add_argument("--hidden", help="hidden layer sizes, comma-separated (default 128,64)")
    g.add_argument("--test-fraction", type=float, help=f"held-out fraction (default {d.test_fraction})")
    g.add_argument("--out", metavar="DIR", help=f"output directory (default {d.out})")
    g.add_argument(
        "--resume", action="store_true", default=None, help="continue from the last checkpoint in --out"
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        default=None,
        help="start afresh in an --out that holds another run (its checkpoints and metrics are deleted)",
    )
    g.add_argument("--keep", type=int, metavar="K", help=f"checkpoints kept, the newest (default {d.keep})")
    g.add_argument(
        "--tensorboard",
        action="store_true",
        default=None,
        help="also write the per-step metrics to --out/tensorboard (needs the tensorboard package)",
    )
    g.add_argument(
        "--backend", choices=BACKEND_CHOICES, help="process-group backend (auto: nccl with GPUs, else gloo)"
    )
    g.add_argument("--no-plots", dest="plots", action="store_false", default=None, help="skip the PNG plots")
    g.add_argument(
        "--no-progress", dest="progress", action="store_false", default=None, help="no progress bar"
    )


def config_from_args(args: argparse.Namespace, **overrides: Any) -> TrainConfig:
    """Defaults < ``--scenario`` < ``--config`` TOML < options given on the command line < ``overrides``.

    The scenario is the one named on the command line, else in the TOML file, else ``default``.
    """
    from_file: dict[str, Any] = load_toml(args.config) if getattr(args, "config", None) else {}
    given: dict[str, Any] = {}
    for name in _FIELDS:
        if name == "penalties":
            continue
        value = getattr(args, name, None)
        if value is not None:
            given[name] = _coerce(name, value)
    if getattr(args, "penalty", None):
        given["penalties"] = penalties_from_options(args.penalty)
    name = overrides.get("scenario", given.get("scenario", from_file.get("scenario", DEFAULT_SCENARIO)))
    settings = get_scenario(name).defaults()
    settings.update(from_file)
    settings.update(given)
    settings.update(overrides)
    settings["scenario"] = name
    return TrainConfig(**settings).validate()
