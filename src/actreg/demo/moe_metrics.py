"""The figures of ``actreg moe``, from logged raw numbers (losses and expert counts) only.

* perplexity of a domain: ``exp(summed next-byte NLL / predicted bytes)``; overall: the same over
  every domain's held-out bytes (the domains hold out the same number of bytes);
* MaxVio of a batch: ``max_e load_e / mean_e load_e - 1`` (Qwen, "Demons in the Detail"; DeepSeek
  calls it the maximal violation), ``load_e`` the top-k assignments to expert ``e``;
* mutual information between domain and chosen expert, in bits, from a ``[domains, experts]``
  table of assignments: ``sum_de p(d,e) log2(p(d,e) / (p(d) p(e)))`` -- 0 when every domain uses
  the experts alike, ``log2(domains)`` at most;
* top-2 share of a domain: the share of its assignments that go to its two most used experts
  (``2/E`` when it spreads evenly, 1 when it uses two experts only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def perplexity(nll_sum: float, tokens: float) -> float:
    return math.exp(nll_sum / tokens)


def max_violation(load: Tensor) -> Tensor:
    """MaxVio over the last dimension (experts) of ``load``; 0 where nothing was routed."""
    load = load.double()
    total = load.sum(-1)
    mean = total / load.shape[-1]
    return torch.where(total > 0, load.amax(-1) / mean.clamp_min(1e-300) - 1.0, 0.0)


def mutual_information(table: Tensor) -> float:
    """I(domain; expert) in bits of a ``[domains, experts]`` table of counts."""
    joint = table.double() / table.sum()
    pd = joint.sum(1, keepdim=True)
    pe = joint.sum(0, keepdim=True)
    ratio = torch.where(joint > 0, joint / (pd * pe), 1.0)
    return float((joint * torch.log2(ratio)).sum())


def top2_share(table: Tensor) -> Tensor:
    """``[domains]``: each domain's share of its assignments on its two most used experts."""
    table = table.double()
    return table.topk(2, dim=-1).values.sum(-1) / table.sum(-1)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def step_windows(load: Tensor) -> Tensor:
    """Global-batch load ``[steps, layers, E]`` of per-micro-batch, per-rank load
    ``[steps, micro, ranks, layers, E]``: an optimizer step's batch is all its micro-batches on
    every rank."""
    return load.sum((1, 2))


def domain_tables(load: Tensor, domain: Tensor, domains: int) -> Tensor:
    """``[layers, domains, E]`` assignments per domain of per-micro-batch load
    ``[..., layers, E]`` whose micro-batch came from ``domain`` ``[...]``."""
    flat = load.reshape(-1, *load.shape[-2:]).double()
    ids = domain.reshape(-1).long()
    out = flat.new_zeros(domains, *load.shape[-2:])
    out.index_add_(0, ids, flat)
    return out.transpose(0, 1)


def run_figures(run: dict[str, object], domain_names: Sequence[str], tail: float = 0.5) -> dict[str, float]:
    """The figures of one run's raw log (see :mod:`actreg.demo.moe_train`): held-out perplexity per
    domain and overall, MaxVio of the global batch and of the micro-batch (mean over the last
    ``tail`` of the steps and over layers), mutual information and top-2 share (held-out routing,
    mean over layers), tokens per second."""
    ev = run["eval"]
    assert isinstance(ev, dict)
    nll = [float(v) for v in ev["nll_sum"]]
    tokens = [float(v) for v in ev["tokens"]]
    out: dict[str, float] = {}
    for name, s, n in zip(domain_names, nll, tokens, strict=True):
        out[f"ppl/{name}"] = perplexity(s, n)
    out["ppl/overall"] = perplexity(sum(nll), sum(tokens))
    load = torch.tensor(run["load"], dtype=torch.float64)  # [steps, micro, ranks, layers, E]
    first = int(load.shape[0] * (1 - tail))
    out["maxvio_global"] = float(max_violation(step_windows(load)[first:]).mean())
    out["maxvio_micro"] = float(max_violation(load[first:]).mean())
    counts = torch.tensor(ev["counts"], dtype=torch.float64)  # [layers, domains, E]
    out["mi_bits"] = sum(mutual_information(c) for c in counts) / counts.shape[0]
    out["top2_share"] = float(top2_share(counts).mean())
    out["tokens_per_s"] = float(run["train_tokens"]) / float(run["train_seconds"])  # type: ignore[arg-type]
    return out
