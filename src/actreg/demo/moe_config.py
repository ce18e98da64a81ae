"""Settings of ``actreg moe``: a dataclass, its options, the ``--quick`` preset and the workers' argv.

Precedence: built-in defaults < ``--quick`` < options given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .moe_data import DEFAULT_DOMAINS, parse_domains

#: the balancing variants, in table order (see :mod:`actreg.demo.moe_variants`)
VARIANTS = ("none", "micro", "global", "window", "bias", "bias+seq")

#: what ``--quick`` changes (a few seconds of training: the test suite's setting)
QUICK: dict[str, Any] = {
    "seeds": [0, 1],
    "steps": 6,
    "micro_batch": 4,
    "context": 32,
    "eval_windows": 8,
    "max_bytes": 100_000,
}


@dataclass
class MoEConfig:
    """Everything a run of ``actreg moe`` depends on (identical on every rank)."""

    out: str = "runs/moe"
    nproc: int = 2
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    domains: list[str] = field(default_factory=lambda: list(DEFAULT_DOMAINS))
    steps: int = 300  #: optimizer steps per run
    accumulation: int = 2  #: micro-batches per rank per optimizer step
    micro_batch: int = 8  #: sequences per rank per micro-batch (each of one domain)
    context: int = 64  #: bytes per sequence
    d: int = 64
    heads: int = 4
    layers: int = 2
    hidden: int = 128
    experts: int = 8
    top_k: int = 2
    lr: float = 3e-3
    coef: float = 1e-2  #: LoadBalance weight, the same in every variant that has one
    seq_coef: float = 1e-4  #: SequenceBalance weight of ``bias+seq`` (DeepSeek-V3's alpha)
    bias_rate: float = 1e-3  #: ExpertBias update speed (DeepSeek-V3's gamma)
    eval_windows: int = 128  #: held-out windows per domain
    max_bytes: int = 1_000_000  #: per domain
    plots: bool = True
    quick: bool = False

    def validate(self) -> MoEConfig:
        for name in ("nproc", "steps", "accumulation", "micro_batch", "context", "d", "heads", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("hidden", "eval_windows", "max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"--top-k must be in [1, --experts={self.experts}], got {self.top_k}")
        if self.d % self.heads:
            raise ValueError(f"--d {self.d} must be a multiple of --heads {self.heads}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds: give different seeds, got {self.seeds}")
        for v in self.variants:
            if v not in VARIANTS:
                raise ValueError(f"--variants: unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
        if not self.variants or len(set(self.variants)) != len(self.variants):
            raise ValueError(f"--variants: give different variants, got {self.variants}")
        parse_domains(",".join(self.domains))
        for name in ("lr", "coef", "seq_coef", "bias_rate"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        return self

    def to_argv(self) -> list[str]:
        """Options that rebuild this config in a worker (``python -m actreg.demo.moe_run ARGV``)."""
        argv: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if f.name == "plots":
                if not value:
                    argv.append("--no-plots")
            elif f.name == "quick":
                if value:
                    argv.append("--quick")
            elif isinstance(value, list):
                argv += [flag, ",".join(str(v) for v in value)]
            else:
                argv += [flag, str(value)]
        return argv


def _ints(text: str) -> list[int]:
    """``"0,1,2"`` or ``"0-11"`` (inclusive ranges) -> a list of integers."""
    out: list[int] = []
    try:
        for part in (t.strip() for t in text.split(",") if t.strip()):
            lo, sep, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
            out += list(range(int(lo), int(hi) + 1)) if sep else [int(part)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers or ranges (0-11), got {text!r}"
        ) from None
    return out


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_moe_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``actreg moe`` (and of its workers); every default is ``None`` (see
    :func:`moe_config_from_args`)."""
    d = MoEConfig()
    parser.add_argument("--quick", action="store_true", default=None, help="a few seconds of training")
    parser.add_argument("--out", metavar="DIR", help=f"output directory (default {d.out})")
    parser.add_argument("--nproc", type=int, metavar="W", help=f"worker processes (default {d.nproc})")
    parser.add_argument(
        "--seeds",
        type=_ints,
        help="seeds, comma-separated or ranges such as 0-11 (default 0,1,2; --quick 0,1)",
    )
    parser.add_argument(
        "--variants", type=_names, help=f"comma-separated, from {','.join(VARIANTS)} (default all)"
    )
    parser.add_argument(
        "--domains", type=_names, help=f"comma-separated (default {','.join(DEFAULT_DOMAINS)})"
    )
    for name, kind, what in (
        ("steps", int, "optimizer steps per run"),
        ("accumulation", int, "micro-batches per rank per optimizer step"),
        ("micro_batch", int, "sequences per rank per micro-batch"),
        ("context", int, "bytes per sequence"),
        ("d", int, "model width"),
        ("heads", int, "attention heads"),
        ("layers", int, "transformer blocks (each with an MoE layer)"),
        ("hidden", int, "hidden units per expert"),
        ("experts", int, "experts per MoE layer"),
        ("top_k", int, "experts per token"),
        ("lr", float, "AdamW learning rate (peak)"),
        ("coef", float, "LoadBalance weight (the same in micro, global, window)"),
        ("seq_coef", float, "SequenceBalance weight of bias+seq"),
        ("bias_rate", float, "ExpertBias update speed"),
        ("eval_windows", int, "held-out windows per domain"),
        ("max_bytes", int, "bytes read per domain"),
    ):
        default = getattr(d, name)
        parser.add_argument(
            "--" + name.replace("_", "-"), type=kind, help=f"{what} (default {default}{_quick_note(name)})"
        )
    parser.add_argument("--no-plots", dest="plots", action="store_false", default=None, help="skip the PNGs")


def _quick_note(name: str) -> str:
    return f"; --quick {QUICK[name]}" if name in QUICK else ""


def moe_config_from_args(args: argparse.Namespace) -> MoEConfig:
    """Defaults < ``--quick`` < options given on the command line."""
    settings: dict[str, Any] = {}
    if args.quick:
        settings.update(QUICK)
        settings["quick"] = True
    for f in dataclasses.fields(MoEConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            settings[f.name] = value
    return MoEConfig(**settings).validate()
