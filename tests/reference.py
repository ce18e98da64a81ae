"""Single-process float64 references, written from the published formulas without actreg's code.

``direct(name, act, mask)`` evaluates a penalty straight from the kept activations of a batch
(torch.cov, Tensor.var, ...). ``ema_reference`` follows the published moving-average definition:
``E_t = decay E_{t-1} + (1 - decay) S_t`` over sums, the value taken of ``E_t``, with the Bessel
correction of the unbiased penalties using the bias-corrected average count ``E_n / (1 - decay^t)``.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from problem import DECAY, LR, SHARDS, batch, make_model

EPS_KL = 1e-6


def rows_of(act: Tensor, mask: Tensor) -> Tensor:
    return act[mask]


def direct(name: str, act: Tensor, mask: Tensor) -> Tensor:
    """The penalty of one batch (``act`` [N, T, d], ``mask`` [N, T]), from its formula."""
    x = rows_of(act, mask)
    m, d = x.shape
    zero = act.sum() * 0.0
    if name == "TAR":
        diff = act[:, 1:] - act[:, :-1]
        pairs = mask[:, 1:] & mask[:, :-1]
        sel = diff[pairs]
        return 1.7 * sel.pow(2).mean() if sel.numel() else zero
    if m == 0:
        return zero
    if name == "L1":
        return 0.7 * x.abs().sum() / m
    if name == "L2":
        return 0.4 * x.pow(2).sum() / m
    if name == "AR":
        return 0.9 * x.pow(2).mean()
    if name == "KLSparsity":
        rho = x.mean(0).clamp(EPS_KL, 1 - EPS_KL)
        p = 0.2
        return 0.8 * (p * torch.log(p / rho) + (1 - p) * torch.log((1 - p) / (1 - rho))).sum()
    if name == "DeCov":
        c = torch.cov(x.T, correction=0)
        return 9.0 * 0.5 * (c.pow(2).sum() - torch.diagonal(c).pow(2).sum())
    if name == "VarianceFloor":
        if m < 2:
            return zero
        return 1.1 * torch.relu(0.6 - torch.sqrt(x.var(0) + 1e-4)).mean()
    if name == "Covariance":
        if m < 2:
            return zero
        c = torch.cov(x.T)
        return 7.0 * (c.pow(2).sum() - torch.diagonal(c).pow(2).sum()) / d
    if name == "LoadBalance":
        top = torch.topk(x, 2, dim=-1).indices
        f = torch.stack([(top == e).sum() for e in range(d)]).to(x.dtype) / (m * 2)
        p_mean = torch.softmax(x, dim=-1).mean(0)
        return 0.9 * 4 * (f * p_mean).sum()
    if name == "ZLoss":
        return 0.05 * torch.logsumexp(x, dim=-1).pow(2).mean()
    raise KeyError(name)


def sums(name: str, act: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Sufficient statistics (sums over kept positions) of one batch, for the EMA reference."""
    x = rows_of(act, mask)
    n = torch.tensor(float(x.shape[0]), dtype=act.dtype)
    if name == "TAR":
        diff = (act[:, 1:] - act[:, :-1])[mask[:, 1:] & mask[:, :-1]]
        return {"q": diff.pow(2).sum(), "n": torch.tensor(float(diff.numel()), dtype=act.dtype)}
    if name in ("L1",):
        return {"a": x.abs().sum(), "n": n}
    if name in ("L2",):
        return {"q": x.pow(2).sum(), "n": n}
    if name == "AR":
        return {"q": x.pow(2).sum(), "n": torch.tensor(float(x.numel()), dtype=act.dtype)}
    if name == "KLSparsity":
        return {"s": x.sum(0), "n": n}
    if name in ("DeCov", "Covariance"):
        return {"s": x.sum(0), "o": torch.einsum("mi,mj->ij", x, x), "n": n}
    if name == "VarianceFloor":
        return {"s": x.sum(0), "q": x.pow(2).sum(0), "n": n}
    if name == "LoadBalance":
        top = torch.topk(x, 2, dim=-1).indices
        f = torch.stack([(top == e).sum() for e in range(x.shape[1])]).to(x.dtype)
        return {"f": f, "p": torch.softmax(x, dim=-1).sum(0), "n": n}
    if name == "ZLoss":
        return {"z": torch.logsumexp(x, dim=-1).pow(2).sum(), "n": n}
    raise KeyError(name)


def value_of(name: str, s: dict[str, Tensor], n_bessel: Tensor) -> Tensor:
    """Penalty of (moving-average) sums ``s``."""
    n = s["n"]
    if float(n) == 0.0:
        return sum(v.sum() for v in s.values()) * 0.0
    if name == "L1":
        return 0.7 * s["a"] / n
    if name == "L2":
        return 0.4 * s["q"] / n
    if name == "AR":
        return 0.9 * s["q"] / n
    if name == "TAR":
        return 1.7 * s["q"] / n
    if name == "KLSparsity":
        rho = (s["s"] / n).clamp(EPS_KL, 1 - EPS_KL)
        return 0.8 * (0.2 * torch.log(0.2 / rho) + 0.8 * torch.log(0.8 / (1 - rho))).sum()
    if name in ("DeCov", "Covariance"):
        mu = s["s"] / n
        biased = s["o"] / n - mu[:, None] * mu[None, :]
        off = biased.pow(2).sum() - torch.diagonal(biased).pow(2).sum()
        if name == "DeCov":
            return 9.0 * 0.5 * off
        if float(n_bessel) <= 1 + 1e-4:  # (the library's margin: moments.BESSEL_MARGIN)
            return off * 0.0
        return 7.0 * off * (n_bessel / (n_bessel - 1)) ** 2 / mu.numel()
    if name == "VarianceFloor":
        if float(n_bessel) <= 1 + 1e-4:  # (the library's margin: moments.BESSEL_MARGIN)
            return s["s"].sum() * 0.0
        var = (s["q"] / n - (s["s"] / n) ** 2) * n_bessel / (n_bessel - 1)
        return 1.1 * torch.relu(0.6 - torch.sqrt(var + 1e-4)).mean()
    if name == "LoadBalance":
        return 0.9 * 4 * ((s["f"] / (n * 2)) * (s["p"] / n)).sum()
    if name == "ZLoss":
        return 0.05 * s["z"] / n
    raise KeyError(name)


def activations(params: list[Tensor], x: Tensor, pattern: str) -> Tensor:
    w1, b1, w2, b2 = params
    h = torch.sigmoid(x @ w1.T + b1)
    return h if pattern == "1" else h @ w2.T + b2


def ema_update(
    previous: dict[str, Tensor] | None, sums: dict[str, Tensor], decay: float
) -> dict[str, Tensor]:
    """``E_t = decay * E_{t-1} + (1 - decay) * S_t`` per statistic (``E_0 = 0``; no graph kept)."""
    if previous is None:
        return {k: (1 - decay) * v for k, v in sums.items()}
    return {k: decay * previous[k].detach() + (1 - decay) * v for k, v in sums.items()}


def sgd_step(loss: Tensor, params: list[Tensor], lr: float, allow_unused: bool = False) -> list[Tensor]:
    """The gradients of ``loss`` (zeros for parameters it does not use, if ``allow_unused``), and
    one plain SGD step ``p -= lr * g`` on ``params`` with them."""
    grads = torch.autograd.grad(loss, params, allow_unused=allow_unused)
    grads = tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True))
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p -= lr * g
    return list(grads)


def run(name: str, pattern: str, sync: str, world_size: int, steps: int) -> dict[str, list]:
    """Plain SGD on one process, the penalty as the only loss. Returns per-step grads and losses.

    ``local``: the loss is the mean over ranks of per-shard penalties (what DDP averaging gives).
    """
    params = [p.detach().clone().requires_grad_(True) for p in make_model().parameters()]
    ema: dict[str, Tensor] | None = None
    grads, losses, rank_losses = [], [], []
    for step in range(steps):
        x, mask = batch(step)
        act = activations(params, x, pattern)
        if sync == "global":
            loss = direct(name, act, mask)
            per_rank = [loss] * world_size
        elif sync == "local":
            bounds = [0, *list(_cumsum(SHARDS[world_size]))]
            per_rank = [direct(name, act[a:b], mask[a:b]) for a, b in itertools.pairwise(bounds)]
            loss = sum(per_rank) / world_size
        else:
            s = sums(name, act, mask)
            ema = ema_update(ema, s, DECAY)
            n_bessel = ema["n"] / (1 - DECAY ** (step + 1))
            loss = value_of(name, ema, n_bessel)
            per_rank = [loss] * world_size
        losses.append(float(loss.detach()))
        rank_losses.append([float(v.detach()) for v in per_rank])
        g = sgd_step(loss, params, LR, allow_unused=True)
        grads.append([gi.numpy().copy() for gi in g])
    return {
        "grads": grads,
        "loss": losses,
        "rank_loss": rank_losses,
        "params": [p.detach().numpy() for p in params],
    }


def _cumsum(xs: list[int]) -> list[int]:
    out, total = [], 0
    for v in xs:
        total += v
        out.append(total)
    return out


def moment_penalties(batches: list[Tensor], sync: str, decay: float = 0.5) -> list[dict[str, float]]:
    """Per step, ``VarianceFloor(1.0)``, ``Covariance(1.0)`` and ``DeCov(1.0)`` of slot ``"h"``.

    Computed in float64 from plain sums (an EMA of them in ``ema`` mode); every batch has the same
    number of rows, which is then also the Bessel sample size.
    """
    out, ema = [], None
    for x in batches:
        s = {"n": torch.tensor(float(x.shape[0]), dtype=torch.float64), "s": x.sum(0), "o": x.T @ x}
        if sync == "ema":
            previous = ema if ema is not None else {k: 0.0 * v for k, v in s.items()}
            ema = {k: decay * previous[k] + (1 - decay) * s[k] for k in s}
            s = ema
        nb = float(x.shape[0])
        mu = s["s"] / s["n"]
        biased = s["o"] / s["n"] - torch.outer(mu, mu)
        unbiased = biased * nb / (nb - 1)

        def off(c: Tensor) -> float:
            return (c.pow(2).sum() - torch.diagonal(c).pow(2).sum()).item()

        out.append(
            {
                "h/VarianceFloor": torch.relu(1.0 - torch.sqrt(torch.diagonal(unbiased) + 1e-4))
                .mean()
                .item(),
                "h/Covariance": off(unbiased) / x.shape[1],
                "h/DeCov": 0.5 * off(biased),
            }
        )
    return out
