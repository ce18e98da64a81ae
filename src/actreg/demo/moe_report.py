"""Outputs of ``actreg moe``: ``moe.json`` (raw logs and figures), ``moe.md`` (the table) and PNGs.

* ``moe_heatmap.png`` -- held-out routing, domain x expert (share of each domain's assignments per
  expert), of the first seed, one row per variant, one column per MoE layer;
* ``moe_curves.png`` -- training curves, mean over seeds: cross-entropy, MaxVio of the global batch,
  and the mutual information between domain and expert of the training routing.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ._deps import pyplot, require
from .moe_config import MoEConfig
from .moe_data import SOURCES, Domain
from .moe_metrics import domain_tables, max_violation, mean_std, mutual_information, run_figures, step_windows
from .moe_variants import DESCRIPTIONS
from .report import write_text

#: table columns: (figure key, header, format)
COLUMNS = (
    ("ppl/overall", "ppl", ".3f"),
    ("maxvio_global", "MaxVio global", ".3f"),
    ("maxvio_micro", "MaxVio micro", ".3f"),
    ("mi_bits", "MI (bits)", ".3f"),
    ("top2_share", "top-2 share", ".3f"),
    ("tokens_per_s", "tokens/s", ".0f"),
)
COLORS = {
    "none": "#7f7f7f",
    "micro": "#d62728",
    "global": "#1f77b4",
    "window": "#17becf",
    "bias": "#2ca02c",
    "bias+seq": "#9467bd",
}


def _save(fig: Any, path: Path) -> None:
    """Write the figure atomically (a temporary file, then ``os.replace``) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    pyplot().close(fig)


def summarize(
    runs: Sequence[Mapping[str, Any]], variants: Sequence[str]
) -> dict[str, dict[str, list[float]]]:
    """``{variant: {figure: [mean, std]}}`` over the seeds (from each run's ``figures``)."""
    out: dict[str, dict[str, list[float]]] = {}
    for v in variants:
        figs = [r["figures"] for r in runs if r["variant"] == v]
        if figs:
            out[v] = {k: list(mean_std([f[k] for f in figs])) for k in figs[0]}
    return out


def _cell(ms: Sequence[float], spec: str) -> str:
    return f"{format(ms[0], spec)} ± {format(ms[1], spec)}"


def format_table(summary: Mapping[str, Mapping[str, Sequence[float]]], domains: Sequence[str]) -> str:
    """The markdown table: one row per variant, mean ± std over the seeds."""
    head = ["variant", *[f"ppl {d}" for d in domains], *[c[1] for c in COLUMNS]]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for v, figs in summary.items():
        cells = [f"`{v}`", *[_cell(figs[f"ppl/{d}"], ".3f") for d in domains]]
        cells += [_cell(figs[key], spec) for key, _, spec in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _paired(
    runs: Sequence[Mapping[str, Any]], a: str, b: str, key: str, relative: bool = False
) -> list[float]:
    """Per-seed differences ``b - a`` (``relative``: ``b / a - 1``) of figure ``key``, over the seeds
    both variants ran."""
    by = {(r["variant"], r["seed"]): float(r["figures"][key]) for r in runs}
    pairs = [(by[(a, s)], by[(b, s)]) for (v, s) in by if v == a and (b, s) in by]
    return [y / x - 1 if relative else y - x for x, y in pairs]


def paired_test(diffs: Sequence[float]) -> tuple[float, float, float | None]:
    """Standard error of the mean, paired t statistic and its two-sided p-value (scipy, which comes
    with scikit-learn; ``None`` without it or with fewer than 2 seeds)."""
    n = len(diffs)
    mean, std = mean_std(diffs)
    se = std / math.sqrt(n) if n > 1 else float("nan")
    t = mean / se if n > 1 and se > 0 else float("nan")
    p: float | None = None
    if n > 1 and math.isfinite(t):
        try:
            stats = require("scipy.stats")
        except ImportError:  # pragma: no cover - scipy comes with scikit-learn
            return se, t, None
        p = float(2 * stats.t.sf(abs(t), n - 1))
    return se, t, p


def format_paired(runs: Sequence[Mapping[str, Any]], variants: Sequence[str]) -> list[str]:
    """Lines: each variant against ``micro``, paired by seed -- the relative change of perplexity
    (mean ± std, standard error, paired t and p) and the change of MI, and in how many seeds each
    went which way."""
    if "micro" not in variants:
        return []
    lines = []
    for v in variants:
        if v == "micro":
            continue
        ppl = [100 * d for d in _paired(runs, "micro", v, "ppl/overall", relative=True)]
        mi = _paired(runs, "micro", v, "mi_bits")
        if not ppl:
            continue
        (pm, ps), (mm, ms) = mean_std(ppl), mean_std(mi)
        se, t, p = paired_test(ppl)
        test = "one seed" if len(ppl) < 2 else f"s.e. {se:.2f}%, t = {t:.2f}"
        test += "" if p is None else f", p = {p:.3f}"
        lines.append(
            f"- `{v}` vs `micro`: perplexity {pm:+.2f}% ± {ps:.2f}% ({test}; lower in "
            f"{sum(d < 0 for d in ppl)} of {len(ppl)} seeds: {', '.join(f'{d:+.2f}%' for d in ppl)}), "
            f"MI {mm:+.3f} ± {ms:.3f} bits (higher in {sum(d > 0 for d in mi)} of {len(mi)})"
        )
    return lines


def domain_rows(domains: Sequence[Domain]) -> list[dict[str, Any]]:
    return [
        {
            "name": d.name,
            "what": SOURCES[d.name][0],
            "source": SOURCES[d.name][1],
            "files": d.files,
            "tokens": d.tokens,
            "train_tokens": int(d.train.numel()),
            "held_out_tokens": int(d.held_out.numel()),
        }
        for d in domains
    ]


def write_outputs(
    cfg: MoEConfig,
    domains: Sequence[Domain],
    runs: list[dict[str, Any]],
    world_size: int,
    wall_seconds: float,
) -> tuple[Path, str]:
    """Figures for every run, then ``moe.json``, ``moe.md`` and (unless ``--no-plots``) the PNGs."""
    out = Path(cfg.out)
    names = [d.name for d in domains]
    for r in runs:
        r["figures"] = run_figures(r, names)
    summary = summarize(runs, cfg.variants)
    machine = f"{platform.machine()}, {torch.get_num_threads()} thread(s) per rank, {world_size} ranks"
    payload = {
        "config": cfg.__dict__,
        "world_size": world_size,
        "domains": domain_rows(domains),
        "wall_seconds": wall_seconds,
        "machine": machine,
        "summary": summary,
        "runs": runs,
    }
    write_text(out / "moe.json", json.dumps(payload))
    table = format_table(summary, names)
    lines = [
        "# actreg moe: micro-batch vs global-batch balance on a small MoE language model",
        "",
        f"{world_size} ranks, seeds {cfg.seeds}, {cfg.steps} optimizer steps of {cfg.accumulation} "
        f"micro-batches x {cfg.micro_batch} sequences x {cfg.context} bytes per rank; model: "
        f"{cfg.layers} layers, d={cfg.d}, {cfg.experts} experts of {cfg.hidden}, top-{cfg.top_k}; "
        f"LoadBalance weight {cfg.coef}, SequenceBalance {cfg.seq_coef}, ExpertBias rate {cfg.bias_rate}. "
        f"Wall time {wall_seconds:.0f} s ({machine}).",
        "",
        "| domain | what | from | files | bytes (train + held out) |",
        "|---|---|---|---:|---:|",
        *[
            f"| {r['name']} | {r['what']} | {r['source']} | {r['files']} | "
            f"{r['tokens']} ({r['train_tokens']} + {r['held_out_tokens']}) |"
            for r in domain_rows(domains)
        ],
        "",
        "Variants: " + "; ".join(f"`{v}`: {DESCRIPTIONS[v]}" for v in cfg.variants) + ".",
        "",
        table,
        "",
        "ppl: held-out perplexity per byte; MaxVio: max load / mean load - 1 of the optimizer step's "
        "global batch (global) and of each rank's micro-batch (micro), mean over the last half of "
        "training and the layers; MI: mutual information between domain and chosen expert on the "
        "held-out text (bits, at most log2(domains)); top-2 share: each domain's share on its two most "
        "used experts (2/E = even spread). Mean ± std over the seeds.",
        "",
        "Paired by seed:",
        "",
        *format_paired(runs, cfg.variants),
        "",
    ]
    write_text(out / "moe.md", "\n".join(lines))
    if cfg.plots:
        plot_heatmaps(runs, names, cfg.variants, out / "moe_heatmap.png")
        plot_curves(runs, names, cfg.variants, out / "moe_curves.png")
    return out / "moe.md", table


def expert_order(share: torch.Tensor) -> list[int]:
    """Experts ordered by the domain they serve most (then by that share, largest first), so that
    specialised routing shows as a block diagonal."""
    main = share.argmax(0)
    return sorted(range(share.shape[1]), key=lambda e: (int(main[e]), -float(share[main[e], e])))


def plot_heatmaps(
    runs: Sequence[Mapping[str, Any]], domains: Sequence[str], variants: Sequence[str], path: Path
) -> None:
    plt = pyplot()
    seed = runs[0]["seed"]
    chosen = [r for v in variants for r in runs if r["variant"] == v and r["seed"] == seed]
    layers = len(chosen[0]["eval"]["counts"])
    fig, axes = plt.subplots(
        len(chosen), layers, figsize=(3.4 * layers, 1.7 * len(chosen)), squeeze=False, layout="constrained"
    )
    image = None
    for row, r in enumerate(chosen):
        counts = torch.tensor(r["eval"]["counts"], dtype=torch.float64)
        for layer in range(layers):
            ax = axes[row][layer]
            share = counts[layer] / counts[layer].sum(-1, keepdim=True)
            order = expert_order(share)
            image = ax.imshow(share[:, order].numpy(), vmin=0, vmax=0.5, cmap="viridis", aspect="auto")
            ax.set_yticks(range(len(domains)), domains if layer == 0 else [""] * len(domains), fontsize=7)
            ax.set_xticks(range(len(order)), [str(e) for e in order], fontsize=7)
            mi = mutual_information(counts[layer])
            ax.set_title(f"{r['variant']}, layer {layer}: MI {mi:.2f} bits", fontsize=8)
    fig.suptitle(
        f"held-out routing: share of each domain's assignments per expert (seed {seed}; experts "
        "ordered by the domain they serve most)",
        fontsize=8,
    )
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="share")
    _save(fig, path)


def _smooth(values: torch.Tensor, width: int) -> torch.Tensor:
    width = max(1, min(width, values.numel()))
    kernel = torch.ones(width, dtype=torch.float64) / width
    padded = torch.cat([values[:1].repeat(width - 1), values])
    return torch.nn.functional.conv1d(padded[None, None], kernel[None, None])[0, 0]


def _window_mi(r: Mapping[str, Any], domains: int, width: int) -> torch.Tensor:
    """MI of the training routing over the last ``width`` steps, at every step (mean over layers)."""
    load = torch.tensor(r["load"], dtype=torch.float64)
    domain = torch.tensor(r["domain"])
    out = []
    for s in range(load.shape[0]):
        lo = max(0, s - width + 1)
        t = domain_tables(load[lo : s + 1], domain[lo : s + 1], domains)
        out.append(sum(mutual_information(c) for c in t) / t.shape[0])
    return torch.tensor(out)


def _paired_curve(runs: Sequence[Mapping[str, Any]], variant: str, base: str) -> torch.Tensor | None:
    """Per-step training cross-entropy of ``variant`` minus ``base``'s, mean over the seeds both ran."""
    by = {(r["variant"], r["seed"]): torch.tensor(r["loss"], dtype=torch.float64).mean((1, 2)) for r in runs}
    diffs = [by[(variant, s)] - by[(base, s)] for (v, s) in by if v == variant and (base, s) in by]
    return torch.stack(diffs).mean(0) if diffs else None


def plot_curves(
    runs: Sequence[Mapping[str, Any]], domains: Sequence[str], variants: Sequence[str], path: Path
) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8), layout="constrained")
    base = "micro" if "micro" in variants else variants[0]
    low, high = float("inf"), -float("inf")
    for v in variants:
        mine = [r for r in runs if r["variant"] == v]
        if not mine:
            continue
        steps = len(mine[0]["loss"])
        width = max(1, steps // 20)
        x = range(1, steps + 1)
        color = COLORS.get(v)
        ce = torch.stack([torch.tensor(r["loss"], dtype=torch.float64).mean((1, 2)) for r in mine]).mean(0)
        smooth = _smooth(ce, width)
        axes[0].plot(x, smooth.numpy(), label=v, color=color)
        tail = smooth[steps // 5 :]
        low, high = min(low, float(tail.min())), max(high, float(tail.max()))
        diff = _paired_curve(runs, v, base)
        if diff is not None:
            axes[1].plot(x, _smooth(diff, width).numpy(), label=v, color=color)
        mv = torch.stack(
            [max_violation(step_windows(torch.tensor(r["load"], dtype=torch.float64))).mean(-1) for r in mine]
        ).mean(0)
        axes[2].plot(x, _smooth(mv, width).numpy(), label=v, color=color)
        mi = torch.stack([_window_mi(r, len(domains), width) for r in mine]).mean(0)
        axes[3].plot(x, mi.numpy(), label=v, color=color)
    if low < high:
        axes[0].set_ylim(low - 0.05 * (high - low), high)
    axes[0].set_ylabel("training cross-entropy (nats/byte)")
    axes[1].set_ylabel(f"cross-entropy minus {base}'s (same seed)")
    axes[1].axhline(0.0, color="black", lw=0.6)
    axes[2].set_ylabel("MaxVio of the global batch")
    axes[3].set_ylabel("MI(domain; expert), bits")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"training curves, mean over {len({r['seed'] for r in runs})} seeds (moving average; MI of the "
        "training routing over the same window of steps)",
        fontsize=9,
    )
    _save(fig, path)
