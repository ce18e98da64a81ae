"""Turning ``{glob: penalties}`` into slots: which modules (and observed names) are regularized."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Mapping, Sequence

from torch import nn

from .centering import check_centered
from .layout import Slot, unique_labels
from .penalty import Penalty

_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def clean_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def named_modules(root: nn.Module) -> dict[str, nn.Module]:
    """``named_modules()`` of ``root`` with wrapper prefixes removed (the root itself excluded)."""
    return {clean_name(n): m for n, m in root.named_modules() if n}


def match_glob(
    pattern: str, names: list[str], where: str, what: str, root: nn.Module | str, hint: str
) -> list[str]:
    """The ``names`` the fnmatch glob ``pattern`` matches; none is a ``ValueError`` naming close
    names (``where``: the argument, ``what``: "module" or "parameter", ``root``: the model, or
    what holds the names, ``hint``: how to write one)."""
    matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if not matched:
        close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.3) or names[:5]
        owner = root if isinstance(root, str) else type(root).__name__
        raise ValueError(
            f"{where} pattern {pattern!r} matches no {what} of {owner}. Close {what} names: {close}. {hint}"
        )
    return matched


def _as_penalties(pattern: str, value: Penalty | Sequence[Penalty]) -> list[Penalty]:
    if isinstance(value, str):
        raise TypeError(
            f"penalties[{pattern!r}] is the string {value!r}; give penalty objects, e.g. "
            "{'fc1': actreg.L1(1e-3)} or {'fc1': [actreg.L1(1e-3), actreg.DeCov(0.1)]}"
        )
    items: list[object] = list(value) if isinstance(value, (list, tuple)) else [value]
    checked: list[Penalty] = []
    for p in items:
        if not isinstance(p, Penalty):
            raise TypeError(f"penalties[{pattern!r}] must be a Penalty or a list of them, got {p!r}")
        check_centered(type(p).__name__, p.centered, p.statistic_shapes(1))
        checked.append(p)
    return checked


def build_slots(
    root: nn.Module,
    penalties: Mapping[str, Penalty | Sequence[Penalty]],
    observed: list[str],
    allow_empty: bool = False,
) -> list[Slot]:
    """One slot per matched module (in ``named_modules()`` order), then one per observed name."""
    if not isinstance(penalties, Mapping):
        raise TypeError(
            "penalties must be a mapping {pattern: penalty or [penalties]}, got "
            f"{type(penalties).__name__} {penalties!r:.80}; e.g. {{'fc1': actreg.L1(1e-3)}}"
        )
    if not penalties and not allow_empty:
        raise ValueError("penalties is empty: give at least one {pattern: penalty} (or weights=...)")
    names = list(named_modules(root))
    per_module: dict[str, list[Penalty]] = {}
    per_observed: dict[str, list[Penalty]] = {name: [] for name in observed}
    for pattern, value in penalties.items():
        items = _as_penalties(pattern, value)
        if pattern in per_observed:
            per_observed[pattern].extend(items)
            continue
        matched = match_glob(
            pattern,
            names,
            "penalty",
            "module",
            root,
            "Patterns are fnmatch globs over named_modules() names (e.g. 'encoder.layers.*.mlp'); "
            "for activations fed through reg.observe(name, ...), list the name in observed=[...].",
        )
        for n in matched:
            # a module listed in `observed` is recorded through observe() only, not its hook
            (per_observed if n in per_observed else per_module).setdefault(n, []).extend(items)
    slots = [Slot(n, tuple(ps), unique_labels(ps), True) for n in names if (ps := per_module.get(n))]
    for name, ps in per_observed.items():
        if not ps:
            raise ValueError(f"observed name {name!r} has no penalties in the mapping")
        slots.append(Slot(name, tuple(ps), unique_labels(ps), False))
    return slots
