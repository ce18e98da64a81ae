"""Outputs of the demo: ``metrics.jsonl``, ``report.md``, PNG plots (matplotlib, Agg backend).

``metrics.jsonl`` holds one JSON object per line: ``{"type": "step", ...}`` for every optimizer step
and ``{"type": "epoch", ...}`` after each epoch (see ``docs/cli.md`` for the fields).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._deps import pyplot

if TYPE_CHECKING:
    from .config import TrainConfig
    from .train import RunResult

MODE_COLORS = {"none": "#7f7f7f", "local": "#d62728", "global": "#1f77b4", "ema": "#2ca02c"}


# ---------------------------------------------------------------------- files
def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` atomically (temporary file + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl(path: str | Path, records: Iterable[Mapping[str, Any]]) -> None:
    """One JSON object per line, written atomically."""
    write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# ---------------------------------------------------------------------- helpers
def _epochs(history: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in history if r["type"] == "epoch"]


def _steps(history: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in history if r["type"] == "step"]


def _step_x(steps: Sequence[Mapping[str, Any]]) -> list[float]:
    """Fractional epoch of each step (the end of epoch ``e`` is ``e``)."""
    per_epoch: dict[int, int] = {}
    for s in steps:
        per_epoch[s["epoch"]] = per_epoch.get(s["epoch"], 0) + 1
    seen: dict[int, int] = {}
    xs = []
    for s in steps:
        seen[s["epoch"]] = seen.get(s["epoch"], 0) + 1
        xs.append(s["epoch"] - 1 + seen[s["epoch"]] / per_epoch[s["epoch"]])
    return xs


def layers_of(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """Regularized layer names, in order, from the epoch records."""
    epochs = _epochs(history)
    return list(epochs[-1]["test_activity"]) if epochs else []


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _num(v: float | None, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def _finish(fig: Any, path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        if ax.get_xlabel() == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    pyplot().close(fig)


# ---------------------------------------------------------------------- single-run plots
def plot_losses(history: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> None:
    """Task loss, accuracy and penalty (global vs per-rank) over training."""
    plt = pyplot()
    steps, epochs = _steps(history), _epochs(history)
    xs = _step_x(steps)
    ex = [e["epoch"] for e in epochs]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    ax.plot(xs, [s["loss"] for s in steps], color="#1f77b4", alpha=0.35, lw=1, label="train (per step)")
    ax.plot(ex, [e["train_loss"] for e in epochs], "o-", color="#1f77b4", label="train (epoch mean)")
    ax.plot(ex, [e["test_loss"] for e in epochs], "s-", color="#ff7f0e", label="test")
    ax.set(title="Task loss (cross-entropy)", xlabel="epoch", ylabel="loss", yscale="log")
    ax.legend()
    ax.grid(alpha=0.3)

    ax = axes[1]
    ax.plot(ex, [100 * e["train_acc"] for e in epochs], "o-", label="train")
    ax.plot(ex, [100 * e["test_acc"] for e in epochs], "s-", label="test (held out)")
    ax.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    ax.legend()
    ax.grid(alpha=0.3)

    ax = axes[2]
    if steps:
        world = max(len(s["penalty_ranks"]) for s in steps)  # W may change on --resume
        for r in range(world):
            ax.plot(
                xs,
                [s["penalty_ranks"][r] if r < len(s["penalty_ranks"]) else math.nan for s in steps],
                lw=0.8,
                alpha=0.6,
                label=f"rank {r}'s local view" if world <= 4 or r == 0 else None,
            )
        ax.plot(xs, [s["penalty_global"] for s in steps], color="black", lw=1.8, label="global batch (true)")
        opt = [s["penalty_opt"] for s in steps]
        if any(
            abs(o - s["penalty_global"]) > 1e-9 * max(1.0, abs(o)) for o, s in zip(opt, steps, strict=True)
        ):
            ax.plot(xs, opt, "--", color="#9467bd", lw=1.2, label="optimized (rank mean)")
    ax.set(title="Total penalty: per-rank vs global", xlabel="epoch", ylabel="penalty value")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    _finish(fig, path)


#: rows of the activity figure: (metric, scale, train label, test label, title, y label)
_ACTIVITY_PANELS = (
    (
        "active_fraction",
        100,
        "train, global batch (per step)",
        "test set (per epoch)",
        "active fraction",
        "active units x positions (%)",
    ),
    (
        "dead_units",
        1,
        "never active in the global batch",
        "never active on the test set",
        "dead units",
        "units",
    ),
)


def plot_activity(history: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> None:
    """Per-layer panels: active fraction, dead units, per-rank disagreement over training."""
    plt = pyplot()
    steps, epochs = _steps(history), _epochs(history)
    layers = layers_of(history)
    xs = _step_x(steps)
    ex = [e["epoch"] for e in epochs]
    fig, axes = plt.subplots(3, len(layers), figsize=(5.2 * len(layers), 10), squeeze=False)
    for col, layer in enumerate(layers):
        for row, (key, scale, train_label, test_label, name, ylabel) in enumerate(_ACTIVITY_PANELS):
            ax = axes[row][col]
            ax.plot(xs, [scale * s["global"][f"{layer}/{key}"] for s in steps], alpha=0.6, label=train_label)
            ax.plot(ex, [scale * e["test_activity"][layer][key] for e in epochs], "s-", label=test_label)
            ax.set(title=f"{layer}: {name}", xlabel="epoch", ylabel=ylabel)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)

        ax = axes[2][col]
        keys = [k for k in (steps[0]["disagreement"] if steps else {}) if k.startswith(f"{layer}/")]
        for k in keys:
            name = k.split("/", 1)[1]
            ax.plot(
                ex,
                [100 * e["disagreement"][k] for e in epochs],
                "o-",
                label=("|local - global| of " if name == "active_fraction" else "rel. error of ") + name,
            )
        ax.set(title=f"{layer}: per-rank vs global statistics", xlabel="epoch", ylabel="mean over ranks (%)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    _finish(fig, path)


def _hist(ax: Any, values: Tensor, label: str | None, color: str | None, bins: Sequence[float]) -> None:
    flat = values.reshape(-1).numpy()
    zero = float((abs(flat) <= 0).mean()) if flat.size else 0.0
    text = f"{label}: " if label else ""
    ax.hist(
        flat,
        bins=bins,
        histtype="step" if label else "stepfilled",
        lw=1.5,
        color=color,
        alpha=1.0 if label else 0.7,
        label=f"{text}{100 * zero:.0f}% exactly 0",
    )


def _bins(tensors: Iterable[Tensor], count: int = 60) -> list[float]:
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return [0.0, 1.0]
    lo = min(float(t.min()) for t in tensors)
    hi = max(float(t.max()) for t in tensors)
    if hi <= lo:
        hi = lo + 1.0
    return [lo + (hi - lo) * i / count for i in range(count + 1)]


def plot_histograms(runs: Mapping[str, Mapping[str, Tensor]], path: Path, title: str = "") -> None:
    """Per-layer activation histograms on the test set; one line per run when several are given."""
    plt = pyplot()
    layers = list(next(iter(runs.values())))
    fig, axes = plt.subplots(1, len(layers), figsize=(5.2 * len(layers), 4.3), squeeze=False)
    several = len(runs) > 1
    for col, layer in enumerate(layers):
        ax = axes[0][col]
        bins = _bins(acts[layer] for acts in runs.values())
        for name, acts in runs.items():
            _hist(ax, acts[layer], name if several else None, MODE_COLORS.get(name), bins)
        ax.set(
            title=f"{layer}: activations on the test set",
            xlabel="activation value",
            ylabel="count (log scale)",
            yscale="log",
        )
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    _finish(fig, path)


# ---------------------------------------------------------------------- report.md
def _epoch_table(epochs: Sequence[Mapping[str, Any]], layers: Sequence[str]) -> list[str]:
    head = (
        [
            "epoch",
            "train loss",
            "test loss",
            "test acc",
            "penalty (global)",
            "objective error",
            "rank disagreement",
        ]
        + [f"{n} active" for n in layers]
        + ["dead units", "time"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for e in epochs:
        cells = [
            str(e["epoch"]),
            _num(e["train_loss"]),
            _num(e["test_loss"]),
            _pct(e["test_acc"]),
            _num(e["penalty_global"]),
            _pct(e["objective_error"]),
            _pct(e["rank_disagreement"]),
        ]
        cells += [_pct(e["test_activity"][n]["active_fraction"]) for n in layers]
        cells += [str(int(sum(e["test_activity"][n]["dead_units"] for n in layers))), f"{e['time_s']:.1f}s"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


GLOSSARY = """\
* **penalty (global)**: total penalty of the global batch (all ranks' shards), mean over the epoch's steps.
* **objective error**: how far the penalty each rank actually optimized is from the global-batch
  penalty (mean relative difference). 0 in `global` mode; the per-rank error in `local` mode; the
  lag of the moving average in `ema` mode; `-` without a penalty.
* **rank disagreement**: mean relative difference between each rank's penalty values computed on its
  own shard and the global-batch values -- what `sync="local"` would optimize instead of the truth.
* **active**: fraction of (unit, sample) pairs with a non-zero activation on the test set;
  **dead units**: units never active on any test sample (all regularized layers).
"""


SPREAD_GLOSSARY = """\
* **penalty (test set)**: the penalties' total with the whole test set as one batch -- the
  objective they stand for, without the noise of small training batches.
* **std**: each unit's standard deviation over the test set, averaged over the layer's units
  (VICReg's variance term keeps it at `gamma` or above); **eff. rank**: the effective rank
  `exp(entropy)` of the normalized eigenvalues of the layer's covariance on the test set (1: one
  direction, the width: isotropic).
"""


def write_run_report(result: RunResult, *, plots: bool = True) -> Path:
    """``report.md`` (+ ``loss.png``, ``activity.png``, ``histograms.png``) in the run's ``--out``."""
    from .launch import torchrun_command

    cfg = result.config
    out = Path(cfg.out)
    epochs = _epochs(result.history)
    layers = layers_of(result.history)
    title = f"actreg demo: digits MLP, {result.world_size} rank(s), sync={cfg.sync}"
    lines = [f"# {title}", ""]
    if epochs:
        final = epochs[-1]
        lines += [
            f"Final (epoch {final['epoch']}): test accuracy **{_pct(final['test_acc'])}**, test loss "
            f"{_num(final['test_loss'])}, global penalty {_num(final['penalty_global'])}, "
            f"objective error {_pct(final['objective_error'])}, per-rank disagreement "
            f"{_pct(final['rank_disagreement'])}.",
            "",
            "## Per epoch",
            "",
            *_epoch_table(epochs, layers),
            "",
            GLOSSARY,
        ]
    settings = cfg.to_dict()
    settings["penalties"] = " ".join(f"{p}={s}" for p, ss in cfg.penalties.items() for s in ss)
    lines += ["## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in settings.items() if k not in ("resume", "progress")]
    lines += [
        f"| world size | `{result.world_size}` |",
        "",
        "Reproduce on one node (or `actreg train` with the same options):",
        "",
        "```",
        torchrun_command(result.world_size, "actreg.demo.train", cfg.to_argv()),
        "```",
        "",
    ]
    if plots and epochs:
        plot_losses(result.history, out / "loss.png", title)
        plot_activity(result.history, out / "activity.png", title)
        plot_histograms({cfg.sync: result.activations}, out / "histograms.png", title)
        lines += [
            "## Plots",
            "",
            "![losses](loss.png)",
            "",
            "![activity](activity.png)",
            "",
            "![histograms](histograms.png)",
            "",
        ]
    lines += ["Files: `metrics.jsonl` (one record per step and per epoch), `checkpoints/epoch_NNN.pt`.", ""]
    path = out / "report.md"
    write_text(path, "\n".join(lines))
    return path


# ---------------------------------------------------------------------- compare
def feature_spread(acts: Tensor) -> dict[str, float]:
    """How spread out a layer's features are over samples (``acts``: ``[..., d]``, positions first).

    ``std``: the mean over units of each unit's standard deviation (unbiased), the quantity VICReg's
    variance term keeps at ``gamma`` or above. ``effective_rank``: ``exp(H(p))`` with ``p`` the
    eigenvalues of the (unbiased) covariance matrix divided by their sum (Roy & Vetterli 2007; RankMe),
    between 1 (one direction) and ``d`` (isotropic); 0 when nothing varies. Computed in float64.
    """
    x = acts.detach().reshape(-1, acts.shape[-1]).to(torch.float64).cpu()
    if x.shape[0] < 2:
        return {"std": 0.0, "effective_rank": 0.0}
    centered = x - x.mean(0)
    cov = centered.T @ centered / (x.shape[0] - 1)
    eig = torch.linalg.eigvalsh(cov).clamp_min(0.0)
    total = float(eig.sum())
    if total <= 0.0:
        return {"std": 0.0, "effective_rank": 0.0}
    p = eig[eig > 0] / total
    return {
        "std": float(cov.diagonal().sqrt().mean()),
        "effective_rank": math.exp(float(-(p * p.log()).sum())),
    }


def held_out_penalty(penalties: Mapping[str, Sequence[str]], activations: Mapping[str, Tensor]) -> float:
    """The total of ``penalties`` (``{glob: [spec, ...]}``) with the whole test set as one batch.

    ``activations``: each regularized layer's outputs on the test set; every spec whose glob
    matches the layer's name adds its value on them, computed in float64. The objective the
    penalties stand for, measured on held-out data without the noise of small training batches.
    """
    from .config import build_penalties

    built = build_penalties(penalties)
    total = 0.0
    for layer, acts in activations.items():
        x = acts.detach().to(torch.float64).cpu()
        for pattern, items in built.items():
            if fnmatch.fnmatchcase(layer, pattern):
                total += sum(float(p.value(p.record(x, None))) for p in items)
    return total


def compare_rows(results: Mapping[str, RunResult]) -> list[dict[str, Any]]:
    """One summary row per mode (final epoch), as written to ``compare.json``."""
    rows = []
    for mode, res in results.items():
        f = res.final
        spread = {n: feature_spread(a) for n, a in res.activations.items()}
        rows.append(
            {
                "mode": mode,
                "test_acc": f["test_acc"],
                "test_loss": f["test_loss"],
                "train_loss": f["train_loss"],
                "penalty_global": f["penalty_global"],
                "penalty_test": held_out_penalty(res.config.penalties, res.activations),
                "objective_error": f["objective_error"],
                "rank_disagreement": f["rank_disagreement"],
                "active_fraction": {n: a["active_fraction"] for n, a in f["test_activity"].items()},
                "dead_units": {n: a["dead_units"] for n, a in f["test_activity"].items()},
                "feature_std": {n: v["std"] for n, v in spread.items()},
                "effective_rank": {n: v["effective_rank"] for n, v in spread.items()},
                "wall_s": res.wall_s,
            }
        )
    return rows


def plot_compare(results: Mapping[str, RunResult], path: Path, title: str = "") -> None:
    """Side by side over epochs: accuracy, penalty, objective error, activity, disagreement."""
    plt = pyplot()
    first = next(iter(results.values()))
    layers = layers_of(first.history)
    ncols = max(3, len(layers) + 1)
    fig, axes = plt.subplots(2, ncols, figsize=(5.2 * ncols, 9), squeeze=False)
    for ax in axes.flat[3:ncols]:
        ax.axis("off")

    def series(res: RunResult, fn: Any) -> tuple[list[int], list[float]]:
        pts = [(e["epoch"], fn(e)) for e in res.epochs]
        pts = [(x, y) for x, y in pts if y is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    panels: list[tuple[Any, str, str, Any, bool]] = [
        (axes[0][0], "Test accuracy", "accuracy (%)", lambda e: 100 * e["test_acc"], False),
        (
            axes[0][1],
            "Total penalty on the global batch",
            "penalty (log)",
            lambda e: e["penalty_global"],
            True,
        ),
        (
            axes[0][2],
            "Objective error: optimized vs global penalty",
            "relative error (log)",
            lambda e: None if e["objective_error"] is None else max(e["objective_error"], 1e-9),
            True,
        ),
    ]
    for col, layer in enumerate(layers):
        panels.append(
            (
                axes[1][col],
                f"{layer}: active fraction (test set)",
                "active (%)",
                lambda e, n=layer: 100 * e["test_activity"][n]["active_fraction"],
                False,
            )
        )
    panels.append(
        (
            axes[1][len(layers)],
            "Per-rank vs global penalty statistics",
            "mean relative difference (%)",
            lambda e: 100 * e["rank_disagreement"],
            False,
        )
    )
    for ax, name, ylabel, fn, log in panels:
        for mode, res in results.items():
            xs, ys = series(res, fn)
            if xs:
                exact = name.startswith("Objective") and mode == "global"
                label = f"{mode} (exactly 0, drawn at 1e-9)" if exact else mode
                ax.plot(xs, ys, "o-", color=MODE_COLORS.get(mode), label=label)
        ax.set(title=name, xlabel="epoch", ylabel=ylabel)
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    _finish(fig, path)


def _compare_argv(cfg: TrainConfig, out: Path, modes: Sequence[str]) -> list[str]:
    """The compare worker's options: ``cfg`` is one mode's run (its ``--out`` and ``--sync``); not those."""
    argv = dataclasses.replace(cfg, out=str(out)).to_argv()
    i = argv.index("--sync")
    return [*argv[:i], *argv[i + 2 :], "--modes", ",".join(modes)]


def write_compare_report(results: Mapping[str, RunResult], out: str | Path, *, plots: bool = True) -> Path:
    """``compare.md``, ``compare.json``, ``compare.png``, ``compare_histograms.png`` in ``out``."""
    from .launch import torchrun_command

    out = Path(out)
    rows = compare_rows(results)
    first = next(iter(results.values()))
    cfg = first.config
    layers = layers_of(first.history)
    title = (
        f"actreg compare: digits MLP, {first.world_size} ranks, batch {cfg.batch_size}, "
        f"{cfg.epochs} epochs, seed {cfg.seed}"
    )
    if cfg.scenario != "default":
        title += f", scenario {cfg.scenario}"
    write_text(
        out / "compare.json", json.dumps({"title": title, "rows": rows}, indent=2, sort_keys=True) + "\n"
    )
    head = ["mode", "test acc", "test loss", "penalty (global)", "penalty (test set)"]
    head += [f"{n} active" for n in layers]
    head += [f"{n} std" for n in layers] + [f"{n} eff. rank" for n in layers]
    head += ["dead units", "rank disagreement", "objective error", "time"]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        cells = [f"`{r['mode']}`", _pct(r["test_acc"]), _num(r["test_loss"]), _num(r["penalty_global"])]
        cells.append(_num(r["penalty_test"]))
        cells += [_pct(r["active_fraction"][n]) for n in layers]
        cells += [_num(r["feature_std"].get(n), ".3f") for n in layers]
        cells += [_num(r["effective_rank"].get(n), ".1f") for n in layers]
        cells += [
            str(int(sum(r["dead_units"].values()))),
            _pct(r["rank_disagreement"]),
            _pct(r["objective_error"]),
            f"{r['wall_s']:.1f}s",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    penalties = " ".join(f"{p}={s}" for p, ss in cfg.penalties.items() for s in ss)
    lines += [
        "",
        f"Same seed, data, initial weights and batch order in every row; penalties `{penalties}`. "
        "`none` trains without the penalty (its value is still measured).",
        "",
        GLOSSARY + SPREAD_GLOSSARY,
        "Per-mode details: `<mode>/metrics.jsonl`. Reproduce with torchrun:",
        "",
        "```",
        torchrun_command(first.world_size, "actreg.demo.compare", _compare_argv(cfg, out, list(results))),
        "```",
        "",
    ]
    if plots:
        plot_compare(results, out / "compare.png", title)
        plot_histograms({m: r.activations for m, r in results.items()}, out / "compare_histograms.png", title)
        lines += ["![comparison](compare.png)", "", "![histograms](compare_histograms.png)", ""]
    path = out / "compare.md"
    write_text(path, "\n".join(lines))
    return path


def format_compare_table(results: Mapping[str, RunResult]) -> str:
    """A plain-text version of the comparison table (printed by ``actreg compare``)."""
    rows = compare_rows(results)
    layers = layers_of(next(iter(results.values())).history)
    head = ["mode", "test acc", "penalty", "test pen."] + [f"{n} act" for n in layers]
    head += [f"{n} std" for n in layers] + [f"{n} rank" for n in layers] + ["dead", "rank dis.", "obj. err"]
    table = [head]
    for r in rows:
        table.append(
            [r["mode"], _pct(r["test_acc"]), _num(r["penalty_global"]), _num(r["penalty_test"])]
            + [_pct(r["active_fraction"][n]) for n in layers]
            + [_num(r["feature_std"].get(n), ".3f") for n in layers]
            + [_num(r["effective_rank"].get(n), ".1f") for n in layers]
            + [
                str(int(sum(r["dead_units"].values()))),
                _pct(r["rank_disagreement"]),
                _pct(r["objective_error"]),
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in table)


def finite(value: Any) -> bool:
    """True if ``value`` (and every number nested in it) is a finite number or None."""
    if value is None or isinstance(value, str):
        return True
    if isinstance(value, (int, float)):
        return math.isfinite(value)
    if isinstance(value, Mapping):
        return all(finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(finite(v) for v in value)
    return False
