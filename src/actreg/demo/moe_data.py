"""The text of ``actreg moe``: several clearly different domains found on every machine, as bytes.

Every domain is read from files that ship with Python or with the ``demo`` extra's dependencies,
so nothing is downloaded:

* ``english`` -- English prose: the Python reference documentation's topics that ``help()`` shows
  (the standard library's ``pydoc_data/topics.py``, its strings only);
* ``python`` -- Python source: the standard library's top-level modules (``*.py``);
* ``c`` -- C source: NumPy's C API headers (``numpy.get_include()``; NumPy comes with scikit-learn);
* ``numbers`` -- numeric tables: scikit-learn's bundled data sets (CSV, some gzip-compressed);
* ``afm`` -- font metric tables: matplotlib's Adobe Font Metrics files (``mpl-data/fonts``).

Each domain is one byte stream (files in sorted order, at most ``max_bytes``), cut into blocks of
:data:`BLOCK` bytes; every :data:`HELD_OUT_EVERY`-th block is held out for evaluation, the rest is
the training stream. A training micro-batch is ``B`` windows of ``T + 1`` bytes at random offsets of
one domain's training stream (packed pipelines fill a micro-batch from one source); which domain
each micro-batch of each rank gets is :func:`domain_schedule`.
"""

from __future__ import annotations

import ast
import gzip
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ._deps import require

#: bytes per block of a domain's stream; every ``HELD_OUT_EVERY``-th block is held out
BLOCK = 2048
HELD_OUT_EVERY = 10
#: the domains of the default run, in this order
DEFAULT_DOMAINS = ("english", "python", "c", "numbers")


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _english() -> list[bytes]:
    source = (_stdlib() / "pydoc_data" / "topics.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    texts = [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) > 200
    ]
    return [t.encode("utf-8") for t in texts]


def _python() -> list[bytes]:
    return [p.read_bytes() for p in sorted(_stdlib().glob("*.py"))]


def _c() -> list[bytes]:
    numpy = require("numpy")
    root = Path(numpy.get_include()) / "numpy"
    return [p.read_bytes() for p in sorted(root.rglob("*.h"))]


def _numbers() -> list[bytes]:
    datasets = require("sklearn.datasets")
    root = Path(str(datasets.__file__)).parent / "data"
    out = []
    for p in sorted(root.iterdir()):
        if p.name.endswith(".csv"):
            out.append(p.read_bytes())
        elif p.name.endswith(".csv.gz"):
            out.append(gzip.decompress(p.read_bytes()))
    return out


def _afm() -> list[bytes]:
    matplotlib = require("matplotlib")
    root = Path(matplotlib.get_data_path()) / "fonts"
    return [p.read_bytes() for p in sorted(root.rglob("*.afm"))]


#: name -> (what it is, where it comes from, reader)
SOURCES: dict[str, tuple[str, str, Callable[[], list[bytes]]]] = {
    "english": ("English prose", "Python's pydoc_data/topics.py (its strings)", _english),
    "python": ("Python source", "the standard library's top-level *.py", _python),
    "c": ("C source", "NumPy's C API headers (numpy.get_include())", _c),
    "numbers": ("numeric tables", "scikit-learn's bundled data sets (CSV)", _numbers),
    "afm": ("font metric tables", "matplotlib's mpl-data/fonts/**/*.afm", _afm),
}


def parse_domains(text: str) -> list[str]:
    """``"english,python"`` -> ``["english", "python"]`` (validated; at least 2, no duplicates)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    for n in names:
        if n not in SOURCES:
            raise ValueError(f"--domains: unknown domain {n!r}; choose from {', '.join(SOURCES)}")
    if len(set(names)) != len(names) or len(names) < 2:
        raise ValueError(f"--domains: give at least 2 different domains, got {text!r}")
    return names


@dataclass
class Domain:
    """One domain's bytes: the training stream and the held-out stream (``uint8`` tensors)."""

    name: str
    train: Tensor
    held_out: Tensor
    files: int

    @property
    def tokens(self) -> int:
        return int(self.train.numel() + self.held_out.numel())


def load_domain(name: str, max_bytes: int) -> Domain:
    """Domain ``name``'s files joined by a blank line, cut at ``max_bytes``, split into blocks."""
    files = SOURCES[name][2]()
    data = b"\n\n".join(files)[:max_bytes]
    if len(data) < HELD_OUT_EVERY * BLOCK:
        raise ValueError(f"domain {name!r} has only {len(data)} bytes on this machine")
    stream = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    blocks = list(torch.split(stream, BLOCK))
    held = [b for i, b in enumerate(blocks) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    train = [b for i, b in enumerate(blocks) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return Domain(name, torch.cat(train), torch.cat(held), len(files))


def load_domains(names: Sequence[str], max_bytes: int) -> list[Domain]:
    return [load_domain(n, max_bytes) for n in names]


def sample_windows(stream: Tensor, count: int, length: int, generator: torch.Generator) -> Tensor:
    """``count`` windows ``[count, length]`` (int64) at random offsets of ``stream``."""
    starts = torch.randint(0, stream.numel() - length + 1, (count,), generator=generator)
    return stream[starts[:, None] + torch.arange(length)].long()


def held_out_windows(stream: Tensor, count: int, length: int) -> Tensor:
    """``count`` windows of ``length`` bytes evenly spaced over the held-out stream (at most as many
    as fit without overlap)."""
    fit = stream.numel() // length
    count = min(count, fit)
    starts = torch.linspace(0, (fit - 1) * length, count).long()
    return stream[starts[:, None] + torch.arange(length)].long()


def domain_schedule(seed: int, steps: int, world_size: int, accumulation: int, domains: int) -> Tensor:
    """``[steps, accumulation, world_size]`` domain index of every micro-batch of every rank.

    Slots in the order (step, micro-batch, rank) take domains from a stream of shuffled rounds of all
    domains (seeded), so every domain gets the same number of micro-batches up to one round, and an
    optimizer step whose ``accumulation * world_size`` slots are a multiple of the number of domains
    sees each domain equally often. The same on every rank; identical for every variant of a seed.
    """
    g = torch.Generator().manual_seed(seed * 7919 + 17)
    slots = steps * accumulation * world_size
    rounds = -(-slots // domains)
    stream = torch.cat([torch.randperm(domains, generator=g) for _ in range(rounds)])[:slots]
    return stream.view(steps, accumulation, world_size)
