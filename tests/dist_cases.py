"""Functions run on every rank of a WorkerPool: ``fn(rank, world_size, *args)``.

They train through actreg (DDP, gloo) and return plain data (floats, numpy arrays, strings) for
the tests to compare with an independent single-process reference.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.profiler import ProfilerActivity, profile

import actreg
from problem import CASES, DECAY, GLOBAL_BATCH, IN_FEATURES, LR, STEPS, batch, make_model, shard_bounds


def make_penalty(name: str) -> actreg.Penalty:
    return eval(CASES[name][0], {k: getattr(actreg, k) for k in actreg.__all__})


def _grads(model: nn.Module) -> list[np.ndarray]:
    return [p.grad.detach().numpy().copy() for p in model.parameters()]


def _params(model: nn.Module) -> list[np.ndarray]:
    return [p.detach().numpy().copy() for p in model.parameters()]


def train(
    rank: int,
    world_size: int,
    names: list[str],
    sync: str,
    steps: int = STEPS,
    first_step: int = 0,
    state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """For each penalty: DDP training of the problem model, penalty as the only loss.

    Returns per penalty the per-step averaged gradients, loss values and metrics, the final
    parameters and the final states (model, optimizer, regularizer) for resumption.
    """
    start, stop = shard_bounds(rank, world_size)
    out: dict[str, Any] = {}
    for name in names:
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        net = DDP(model)
        reg = actreg.ActivityRegularizer(net, {CASES[name][1]: make_penalty(name)}, sync=sync, decay=DECAY)
        if state is not None:
            model.load_state_dict(state[name]["model"])
            opt.load_state_dict(state[name]["opt"])
            reg.load_state_dict(state[name]["reg"])
        grads, losses, metrics = [], [], []
        for step in range(first_step, first_step + steps):
            x, mask = batch(step)
            opt.zero_grad()
            with reg.mask(mask[start:stop]):
                y = net(x[start:stop])
            loss = reg.loss()
            (loss + 0.0 * y.sum()).backward()  # every parameter takes part, as DDP expects
            grads.append(_grads(model))
            losses.append(loss.item())
            metrics.append(reg.metrics())
            opt.step()
        out[name] = {
            "grads": grads,
            "loss": losses,
            "metrics": metrics,
            "params": _params(model),
            "state": {"model": model.state_dict(), "opt": opt.state_dict(), "reg": reg.state_dict()},
        }
        reg.remove()
    return out


def _collectives(prof: Any) -> list[str]:
    return [e.name for e in prof.events() if e.name.startswith("c10d::")]


def count_collectives(rank: int, world_size: int, sync: str) -> dict[str, list[list[str]]]:
    """Collective ops seen in ``loss()`` and in ``backward()`` for 4 steps (model without DDP)."""
    model = make_model()
    reg = actreg.ActivityRegularizer(
        model,
        {
            "0": [actreg.L1(0.1), actreg.DeCov(0.1)],
            "1": actreg.VarianceFloor(1.0),
            "2": actreg.LoadBalance(4, 2, 0.1),
        },
        sync=sync,
    )
    start, stop = shard_bounds(rank, world_size)
    in_loss, in_backward = [], []
    for step in range(4):
        x, _ = batch(step)
        model(x[start:stop])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            loss = reg.loss()
        in_loss.append(_collectives(prof))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            loss.backward()
        in_backward.append(_collectives(prof))
    return {"loss": in_loss, "backward": in_backward}


def layout_mismatch(rank: int, world_size: int, kind: str) -> str:
    """Rank 1 builds a different regularizer; every rank must raise, none may hang."""
    model = make_model()
    if kind == "penalty":
        penalties: dict[str, Any] = {"1": actreg.L1(0.1) if rank != 1 else actreg.L2(0.1)}
    elif kind == "pattern":
        penalties = {"1": actreg.L1(0.1)} if rank != 1 else {"1": actreg.L1(0.1), "2": actreg.ZLoss(0.1)}
    elif kind == "weight":
        penalties = {"1": actreg.L1(0.1 if rank != 1 else 0.2)}
    elif kind in ("sync", "local", "nonfinite", "record_eval", "weight_params", "weight_shapes"):
        penalties = {"1": actreg.L1(0.1)}
    else:
        raise ValueError(kind)
    other = {"sync": "ema", "local": "local"}.get(kind, "global")
    sync = other if rank == 1 else "global"
    extra: dict[str, Any] = {}
    if kind == "weight_params":  # the same penalty and count, on another parameter of the same model
        extra["weights"] = {"2.weight" if rank == 1 else "0.weight": actreg.WeightL2(0.1)}
    if kind == "weight_shapes":  # the same name, label and count, on a parameter of another shape
        if rank == 1:
            model[2] = nn.Linear(model[2].in_features, 3).double()
        extra["weights"] = {"2.weight": actreg.WeightL2(0.1)}
    if kind == "nonfinite" and rank == 1:
        extra["nonfinite"] = "skip"
    if kind == "record_eval" and rank == 1:
        extra["record_eval"] = True
    reg = actreg.ActivityRegularizer(model, penalties, sync=sync, **extra)
    x, _ = batch(0)
    model(x)
    t0 = time.monotonic()
    try:
        reg.loss()
    except actreg.LayoutMismatchError as err:
        return f"{time.monotonic() - t0:.3f}s {err}"
    return "no error"


def recording_error(rank: int, world_size: int) -> str:
    """Rank 1 passes a mask of the wrong shape; every rank must raise RecordingError."""
    model = make_model()
    reg = actreg.ActivityRegularizer(model, {"1": actreg.L1(0.1)})
    x, mask = batch(0)
    bad = mask if rank != 1 else mask[:, :2]
    with reg.mask(bad):
        model(x)
    value = reg.loss().item()  # decided on the device: zero on every rank, raised by the next call
    try:
        reg.check()
    except actreg.RecordingError as err:
        return f"value {value}: {err}"
    return "no error"


def nonfinite(rank: int, world_size: int, policy: str) -> str:
    """Rank 0 records an infinite activation: every rank raises (or skips) in the same step."""
    model = make_model()
    reg = actreg.ActivityRegularizer(model, {"1": actreg.L1(0.1)}, nonfinite=policy)
    x, _ = batch(0)
    if rank == 0:
        with torch.no_grad():
            model[0].bias[0] = float("nan")
    model(x)
    loss = reg.loss()
    loss.backward()
    # rank 1's activations are finite: its gradient from the skipped penalty must be exactly zero
    grads_finite = all(bool((p.grad == 0).all()) for p in model[0].parameters())
    try:
        reg.check()
    except actreg.NonFiniteStatisticError as err:
        return f"raised: {err}"
    return f"value: {loss.item()} skipped: {reg.metrics()['skipped_steps']} finite: {grads_finite}"


def _average_gradients(model: nn.Module, world_size: int, group: Any = None) -> None:
    """What DDP does after backward: average every gradient over the ranks."""
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, group=group)
        p.grad /= world_size


def skipped_module(rank: int, world_size: int, sync: str) -> dict[str, Any]:
    """Module "2" (router logits) runs only on rank 0; "1" everywhere. Returns averaged grads."""
    model = make_model()
    reg = actreg.ActivityRegularizer(
        model, {"1": actreg.L2(0.3), "2": actreg.ZLoss(0.2)}, sync=sync, decay=DECAY
    )
    start, stop = shard_bounds(rank, world_size)
    results = []
    for step in range(2):
        x, _ = batch(step)
        model.zero_grad()
        h = model[1](model[0](x[start:stop]))
        if rank == 0:
            h = model[2](h)
        reg.loss().backward()
        _average_gradients(model, world_size)
        results.append({"grads": _grads(model), "loss": reg.metrics()["total"]})
    return {"steps": results}


def zero_count(rank: int, world_size: int, names: list[str], sync: str) -> dict[str, Any]:
    """Every position masked out on every rank: penalty 0 and zero gradient, never NaN."""
    out = {}
    for name in names:
        model = make_model()
        net = DDP(model)
        reg = actreg.ActivityRegularizer(net, {CASES[name][1]: make_penalty(name)}, sync=sync, decay=DECAY)
        start, stop = shard_bounds(rank, world_size)
        x, mask = batch(0)
        with reg.mask(torch.zeros_like(mask[start:stop])):
            y = net(x[start:stop])
        loss = reg.loss()
        (loss + 0.0 * y.sum()).backward()
        out[name] = {"loss": loss.item(), "grads": _grads(model)}
    return out


def subgroup(rank: int, world_size: int) -> dict[str, Any] | None:
    """A regularizer on the subgroup {0, 2} of 3 ranks; rank 1 is not part of it."""
    group = dist.new_group([0, 2])
    if rank == 1:
        return None
    model = make_model()
    reg = actreg.ActivityRegularizer(model, {"1": actreg.VarianceFloor(1.1, gamma=0.6)}, process_group=group)
    start, stop = {0: (0, 3), 2: (3, 7)}[rank]
    x, _ = batch(0)
    model(x[start:stop])
    loss = reg.loss()
    loss.backward()
    _average_gradients(model, 2, group)
    return {"loss": loss.item(), "grads": _grads(model)}


def custom_penalty(rank: int, world_size: int) -> dict[str, Any]:
    """The user-written penalty from the docs, trained with DDP in global mode."""
    from custom_penalty import MeanTarget

    model = make_model()
    net = DDP(model)
    reg = actreg.ActivityRegularizer(net, {"1": MeanTarget(weight=2.0, target=0.3)})
    start, stop = shard_bounds(rank, world_size)
    x, mask = batch(0)
    with reg.mask(mask[start:stop]):
        y = net(x[start:stop])
    loss = reg.loss()
    (loss + 0.0 * y.sum()).backward()
    return {"loss": loss.item(), "grads": _grads(model)}


def large_mean(rank: int, world_size: int, sync: str) -> list[dict[str, float]]:
    """float32 activations with mean 300 and std 0.3 on uneven shards: centred moments."""
    reg = actreg.ActivityRegularizer(
        nn.Identity(),
        {"h": [actreg.VarianceFloor(1.0), actreg.Covariance(1.0), actreg.DeCov(1.0)]},
        observed=["h"],
        sync=sync,
        decay=0.5,
    )
    sizes = {1: [512], 2: [400, 112], 3: [300, 0, 212]}[world_size]
    start = sum(sizes[:rank])
    out = []
    for step in range(3):
        x = large_mean_batch(step)
        reg.observe("h", x[start : start + sizes[rank]].float())
        reg.loss()
        out.append(reg.metrics())
    return out


def large_mean_batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(50 + step)
    x = 300.0 + 0.3 * torch.randn(512, 4, generator=g, dtype=torch.float64)
    x[:, 1] += 0.2 * x[:, 0]
    return x


def fsdp2(rank: int, world_size: int, names: list[str]) -> dict[str, Any] | str:
    """The penalty as the only loss under FSDP2 (``fully_shard``): full gradients per penalty."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        return "no fully_shard in this torch"
    import warnings

    start, stop = shard_bounds(rank, world_size)
    x, mask = batch(0)
    out = {}
    for name in names:
        model = make_model()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "returned a view tensor": we do no in-place ops on it
            fully_shard(model)
            reg = actreg.ActivityRegularizer(model, {CASES[name][1]: make_penalty(name)})
            with reg.mask(mask[start:stop]):
                y = model(x[start:stop])
            loss = reg.loss()
            (loss + 0.0 * y.sum()).backward()
        out[name] = {
            "loss": loss.item(),
            "grads": [p.grad.full_tensor().numpy().copy() for p in model.parameters()],
        }
        reg.remove()
    return out


def hot_path_reads(rank: int, world_size: int, syncs: list[str]) -> dict[str, dict[str, Any]]:
    """test_hot_path: DDP training with every built-in penalty and a padding mask, uneven shards.

    The observed name ``"extra"`` gets a 64-wide activation (the router logits repeated) with DeCov and
    Covariance: 64 > 2 ranks x 25 positions, so its Gram matrix is exchanged as rows after step 1.
    After two warm-up steps, two steps run under ``host_reads_raise(raising=False)`` (log only: a rank
    that raised would leave the other waiting in the collective) and one under the profiler (profiling
    a DDP step costs about a second on 2 cores). Returns per sync mode the logged reads, the reading ops,
    the metrics of the last step and the slots that exchange rows.
    """
    from test_hot_path import batches, host_reads_raise, make_trainer, profiled

    def wide(y: torch.Tensor) -> torch.Tensor:
        return y.repeat(1, 1, 16)

    start, stop = shard_bounds(rank, world_size)
    out: dict[str, dict[str, Any]] = {}
    for sync in syncs:
        extra = [actreg.DeCov(0.1), actreg.Covariance(0.1)]
        t = make_trainer(sync, extra=wide, wrap=DDP, extra_penalties=extra)
        data = [(x.narrow(0, start, stop - start), m.narrow(0, start, stop - start)) for x, m in batches(5)]
        for x, mask in data[:2]:
            t.step(x, mask)
        with host_reads_raise(raising=False) as log:
            for x, mask in data[2:4]:
                t.step(x, mask)
        with profiled() as ops:
            t.step(*data[4])
        rows = getattr(t.reg.layout, "rows", None)  # (None: no rows mode in this version)
        out[sync] = {"log": list(log), "ops": list(ops), "metrics": t.reg.metrics(), "rows": rows}
    return out


WIDE = 48  #: features of the wide layer: the Gram (48 x 48) is larger than the rows of all ranks


def make_wide_model(width: int = WIDE) -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(IN_FEATURES, width), nn.Tanh()).double()


def wide_batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(2000 + step)
    return torch.randn(GLOBAL_BATCH, IN_FEATURES, generator=g, dtype=torch.float64) + 0.5


def gram_rows(rank: int, world_size: int, sync: str, steps: int = 3, grow: bool = False) -> dict[str, Any]:
    """DeCov + Covariance on a 48-wide layer: rows are exchanged instead of Grams after step 1.

    Returns per step the loss, the gradients (DDP-averaged) and the size of the collective.
    With ``grow``, rank 0 records more positions in step 2 than in step 1 (more than the capacity).
    """
    model = make_wide_model()
    net = DDP(model)
    reg = actreg.ActivityRegularizer(
        net, {"1": [actreg.DeCov(weight=9.0), actreg.Covariance(weight=7.0)]}, sync=sync, decay=DECAY
    )
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    start, stop = shard_bounds(rank, world_size)
    out: dict[str, Any] = {"loss": [], "grads": [], "sizes": [], "error": None}
    real_sum = reg._get_exchange().sum_  # counts the elements of the step's collective
    for step in range(steps):
        x = wide_batch(step)[start:stop]
        if grow and step == 1 and rank == 0:
            x = torch.cat([x, x])
        opt.zero_grad()
        try:
            y = net(x)
            sent: list[int] = []
            reg._get_exchange().sum_ = lambda t, sent=sent: (sent.append(t.numel()), real_sum(t))[1]
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                loss = reg.loss()
        except actreg.RecordingError as err:
            out["error"] = str(err)
            break
        (loss + 0.0 * y.sum()).backward()
        collectives = [e.name for e in prof.events() if e.name.startswith("c10d::")]
        out["sizes"].append({"sent": sent, "collectives": collectives})
        out["loss"].append(loss.item())
        out["grads"].append(_grads(model))
        opt.step()
    return out


def wide_kernel(rank: int, world_size: int, width: int, steps: int = 3) -> dict[str, Any]:
    """DeCov + Covariance (global) on a ``width``-wide layer with few rows: rows from the first step.

    Rank 0 records its shard in two calls per step (the first step's rows then grow across calls);
    the last rank masks its first position in step 0 (the first step's rows are moved to the
    common shift: a masked row must stay 0). Gradients are averaged by hand (two forwards per
    step). Returns per step the loss, the gradients and the largest number of elements of any
    operand of any op of the step (forward, ``loss()``, backward), recorded by the profiler.
    """
    model = make_wide_model(width)
    reg = actreg.ActivityRegularizer(model, {"1": [actreg.DeCov(weight=9.0), actreg.Covariance(weight=7.0)]})
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    start, stop = shard_bounds(rank, world_size)
    out: dict[str, Any] = {"loss": [], "grads": [], "largest": [], "rows": None}
    for step in range(steps):
        x = wide_batch(step)[start:stop]
        opt.zero_grad()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            parts = [x[:2], x[2:]] if rank == 0 else [x]
            mask = None
            if step == 0 and rank == world_size - 1:
                mask = torch.arange(len(x)) > 0
            with reg.mask(mask):
                ys = [model(p) for p in parts]
            loss = reg.loss()
            (loss + 0.0 * sum(y.sum() for y in ys)).backward()
        _average_gradients(model, world_size)
        shapes = [s for e in prof.events() for s in (e.input_shapes or []) if s and isinstance(s[0], int)]
        out["largest"].append(max(int(np.prod(s)) for s in shapes))
        out["loss"].append(loss.item())
        out["grads"].append(_grads(model))
        opt.step()
    reg.check()
    out["rows"] = dict(reg.layout.rows)
    return out
