"""The training step's hot path: no host-device synchronisation, little added memory, masks without indexing.

actreg promises that a training step (forward with recording, ``reg.loss()``, backward, optimizer step)
never waits for the device: decisions are taken on the device and read at the *next* call, masks are
applied with ``torch.where`` instead of boolean indexing (whose output shape depends on the data, so the
host must read a count first), and each recorded activation saves for backward only the tensor the
layer produced. On a GPU a single hidden read stalls the launch queue every step; an extra saved float32
copy of a bf16 activation triples its memory. Neither shows up in a correctness test, so this module
checks them directly, on CPU:

1. **No reads in a step** (every built-in penalty, ``sync`` = global/ema/local, one rank and two under
   DDP -- where a wide slot exchanges its Gram matrix as rows --, and a step with a recording error):
   (a) the Python methods that read a tensor's values on the host (``item``, ``tolist``, ``__bool__``,
   ...) and boolean-mask indexing are patched to fail while the measured steps run; (b) the same steps
   are profiled, and no aten op that reads values back (``_local_scalar_dense``, ``item``, ``nonzero``,
   ``masked_select``, ...) nor any ``index`` op may run. Both detectors are shown to fire on a step that
   does read (the documented exception: a user penalty that only implements ``statistics(rows)`` gets
   boolean-indexed rows).
2. **Saved bytes under bf16 autocast**: what autograd keeps for backward (``saved_tensors_hooks``,
   distinct storages), with and without actreg, for 512 and for 16 positions. When the model keeps the
   regularized activation anyway, actreg may add at most 5 % of its bytes; when it does not, at most the
   activation itself plus 5 %. A naive ``x.float().abs().sum()`` regularizer is measured too, to show
   that the bound can fail. A failure lists the storages that actreg's code saved, with the line.
3. **Masks**: with a padding mask the step issues no ``nonzero``/``index``, and the values still equal a
   float64 reference that uses boolean indexing, to 1e-10 relative.
"""

from __future__ import annotations

import contextlib
import math
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

import actreg

# ====================================================================== detectors
#: aten ops that copy values to the host (or need a data-dependent output size, which on a GPU makes
#: the host wait for a count): ``_local_scalar_dense`` is what every ``item()``/``bool()``/``float()``
#: of a device tensor ends in.
READING_OPS = frozenset(
    {
        "aten::_local_scalar_dense",
        "aten::item",
        "aten::is_nonzero",
        "aten::nonzero",
        "aten::nonzero_numpy",
        "aten::argwhere",
        "aten::masked_select",
        "aten::equal",
        "aten::allclose",
        "aten::_unique",
        "aten::_unique2",
        "aten::unique_dim",
        "aten::unique_consecutive",
    }
)
#: advanced indexing. With a bool index these call ``nonzero`` (caught above); the profiler records
#: the dtypes of plain tensor arguments but not of the index *list* (its entry is ''), so any of
#: them is reported: actreg's step uses ``index_select``/``narrow``/``select`` and the test models
#: here do not index at all.
INDEX_OPS = frozenset({"aten::index", "aten::index_put_", "aten::_index_put_impl_"})

#: ``torch.Tensor`` methods that read values on the host. ``tolist``/``numpy`` of a CPU tensor run no
#: aten op at all (the profiler cannot see them), hence the patches.
READING_METHODS = (
    "item",
    "tolist",
    "numpy",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "__complex__",
    "nonzero",
    "argwhere",
    "masked_select",
    "unique",
)
READING_FUNCTIONS = ("nonzero", "argwhere", "masked_select", "unique", "equal", "allclose")

_SRC = str(Path(actreg.__file__).resolve().parent)


class HostRead(AssertionError):
    """Raised by a patched method; also logged, since actreg turns recording exceptions into errors."""


def _caller() -> str:
    """Where a read came from: the innermost actreg frame of the stack, else the direct caller."""
    frames = traceback.extract_stack()[:-3]
    for frame in reversed(frames):
        if frame.filename.startswith(_SRC):
            return f"{frame.filename[len(_SRC) + 1 :]}:{frame.lineno} ({frame.line})"
    frame = frames[-1]
    return f"{Path(frame.filename).name}:{frame.lineno} ({frame.line})"


def _is_bool_index(index: Any) -> bool:
    items = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in items)


@contextlib.contextmanager
def host_reads_raise(raising: bool = True) -> Iterator[list[str]]:
    """Within the block every host read of tensor values raises ``HostRead``; yields the log of them.

    With ``raising=False`` reads are only logged (and then performed), for multi-process cases where a
    rank that raised would leave the others waiting in a collective.

    Patched with pytest's ``MonkeyPatch`` and undone on exit, so nothing outside the measured steps
    (``metrics()``, assertions) is affected. The log matters: a read inside a forward hook raises into
    actreg's recorder, which stores it as a recording error instead of propagating it.
    """
    log: list[str] = []

    def fail(what: str) -> None:
        log.append(f"{what} at {_caller()}")
        if raising:
            raise HostRead(log[-1])

    def reader(owner: Any, name: str) -> Callable[..., Any]:
        original = getattr(owner, name)

        def patched(*args: Any, **kwargs: Any) -> Any:
            fail(f"{'Tensor' if owner is torch.Tensor else 'torch'}.{name}")
            return original(*args, **kwargs)

        return patched

    getitem, setitem, where = torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.where

    def checked_getitem(self: Tensor, index: Any) -> Any:
        if _is_bool_index(index):
            fail("boolean-mask indexing x[mask]")
        return getitem(self, index)

    def checked_setitem(self: Tensor, index: Any, value: Any) -> None:
        if _is_bool_index(index):
            fail("boolean-mask assignment x[mask] = v")
        setitem(self, index, value)

    def checked_where(*args: Any, **kwargs: Any) -> Any:
        if len(args) + len(kwargs) == 1:
            fail("torch.where(condition) (= nonzero)")
        return where(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        for name in READING_METHODS:
            mp.setattr(torch.Tensor, name, reader(torch.Tensor, name))
        for name in READING_FUNCTIONS:
            mp.setattr(torch, name, reader(torch, name))
        mp.setattr(torch.Tensor, "__getitem__", checked_getitem)
        mp.setattr(torch.Tensor, "__setitem__", checked_setitem)
        mp.setattr(torch, "where", checked_where)
        yield log


def device_reads(prof: Any) -> list[str]:
    """Reading and indexing ops of a profile, with their input dtypes and the op that issued them."""
    found = []
    for e in prof.events():
        if e.name in READING_OPS or e.name in INDEX_OPS:
            parent = e.cpu_parent.name if e.cpu_parent is not None else "top level"
            found.append(f"{e.name}{list(e.input_dtypes)} in {parent}")
    return found


@contextlib.contextmanager
def profiled() -> Iterator[list[str]]:
    """Profile the block (CPU, input shapes and dtypes); yields the list of device reads, filled on exit."""
    found: list[str] = []
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        yield found
    found.extend(device_reads(prof))


# ====================================================================== 1. no reads in a step
BATCH, TIME, IN, HIDDEN, EXPERTS = 7, 5, 5, 8, 4  # BATCH: problem.GLOBAL_BATCH, for its shards


class Tagger(nn.Module):
    """``[batch, time, IN] -> [batch, time, EXPERTS]``: a ReLU layer, a sigmoid layer, router logits."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(IN, HIDDEN)
        self.act = nn.ReLU()
        self.proj = nn.Linear(HIDDEN, HIDDEN)
        self.gate = nn.Sigmoid()
        self.router = nn.Linear(HIDDEN, EXPERTS)

    def forward(self, x: Tensor) -> Tensor:
        return self.router(self.gate(self.proj(self.act(self.embed(x)))))


def every_penalty() -> dict[str, list[actreg.Penalty]]:
    return {
        "act": [
            actreg.L1(0.1),
            actreg.L2(0.1),
            actreg.AR(0.1),
            actreg.TAR(0.1, time_dim=1),
            actreg.DeCov(0.1),
            actreg.VarianceFloor(0.1),
            actreg.Covariance(0.1),
        ],
        "gate": [actreg.KLSparsity(0.2, 0.1)],
        "router": [actreg.LoadBalance(EXPERTS, 2, 0.1), actreg.ZLoss(0.1)],
    }


def batches(count: int, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """Inputs ``[batch, time, IN]`` and padding masks ``[batch, time]`` (made before any measurement)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        x = torch.randn(BATCH, TIME, IN, generator=g)
        mask = torch.rand(BATCH, TIME, generator=g) > 0.3
        mask[:, :2] = True  # every sequence has a kept time pair
        out.append((x, mask))
    return out


@dataclass
class Trainer:
    """A plain training loop around a regularizer; ``extra`` (if set) is observed after each forward."""

    model: nn.Module
    reg: actreg.ActivityRegularizer
    opt: torch.optim.Optimizer
    extra: Callable[[Tensor], Tensor] | None = None

    def step(self, x: Tensor, mask: Tensor) -> None:
        self.opt.zero_grad()
        with self.reg.mask(mask):
            y = self.model(x)
        if self.extra is not None:
            self.reg.observe("extra", self.extra(y), mask)
        task = torch.where(mask.unsqueeze(-1), y, 0.0).square().sum() / x.shape[0]
        (task + self.reg.loss()).backward()
        self.opt.step()


def make_trainer(
    sync: str,
    extra: Callable[[Tensor], Tensor] | None = None,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
    extra_penalties: list[actreg.Penalty] | None = None,
) -> Trainer:
    """``wrap``: e.g. ``DistributedDataParallel`` (the regularizer is then built on the wrapper);
    ``extra_penalties`` (default ``[L2]``) are those of the observed name ``"extra"``."""
    torch.manual_seed(0)
    model: nn.Module = Tagger()
    if wrap is not None:
        model = wrap(model)
    penalties: dict[str, Any] = every_penalty()
    observed: list[str] = []
    if extra is not None:
        penalties["extra"] = extra_penalties or [actreg.L2(0.1)]
        observed.append("extra")
    reg = actreg.ActivityRegularizer(model, penalties, sync=sync, decay=0.5, observed=observed)
    # SGD (momentum, weight decay) reads nothing. Not Adam: on CPU it keeps its step count in a host
    # tensor and calls .item() on it (torch/optim/optimizer.py, _get_value) -- a read of host memory,
    # no device sync, but it would trip the patches and the profiler, which would then need narrowing.
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    return Trainer(model, reg, opt, extra)


def assert_metrics_live(m: dict[str, float]) -> None:
    """After the measured steps: every penalty value finite and non-zero (the test was not vacuous)."""
    assert m, "metrics() is empty: nothing was recorded"
    assert all(math.isfinite(v) for v in m.values()), m
    penalties = [f"{slot}/{p.name}" for slot, ps in every_penalty().items() for p in ps]
    for key in [*penalties, "total"]:
        assert m[key] != 0.0, (key, m)
    for slot in every_penalty():
        assert m[f"{slot}/count"] > 0, m


SYNCS = ["global", "ema", "local"]


@pytest.mark.parametrize("sync", SYNCS)
def test_training_step_never_reads_the_device(sync: str) -> None:
    """Every built-in penalty, a padding mask: forward, ``loss()``, backward and SGD step read nothing."""
    data = batches(6)
    t = make_trainer(sync)
    for x, mask in data[:2]:  # the first loss() agrees on the layout once: it may read
        t.step(x, mask)
    with host_reads_raise() as log:  # (a) Python-level reads raise
        for x, mask in data[2:4]:
            t.step(x, mask)
    assert not log, f"a training step read tensor values on the host (sync={sync!r}):\n" + "\n".join(log)
    with profiled() as ops:  # (b) no reading op reaches the dispatcher
        for x, mask in data[4:6]:
            t.step(x, mask)
    assert not ops, f"a training step ran ops that read the device (sync={sync!r}):\n" + "\n".join(ops)
    assert_metrics_live(t.reg.metrics())


def test_ddp_training_step_never_reads_the_device(pools: Any) -> None:
    """Two gloo ranks under DDP, uneven shards: ``global``/``ema`` go through the collective here. An
    extra 64-wide observed slot with DeCov and Covariance is wider than both ranks' positions together,
    so from the second step on its Gram matrix travels as rows (``layout.rows``)."""
    import dist_cases

    for rank, result in enumerate(pools[2].run(dist_cases.hot_path_reads, ["global", "ema"], timeout=120)):
        for sync, r in result.items():
            assert not r["log"], f"rank {rank}, sync={sync!r}: host reads in a step:\n" + "\n".join(r["log"])
            assert not r["ops"], f"rank {rank}, sync={sync!r}: reading ops in a step:\n" + "\n".join(r["ops"])
            assert_metrics_live(r["metrics"])
            assert r["metrics"]["extra/DeCov"] > 0 and r["metrics"]["extra/Covariance"] > 0, r["metrics"]
            assert r["rows"] != {}, f"the wide slot did not exchange rows: {r['rows']}"


@pytest.mark.parametrize("sync", SYNCS)
def test_step_with_a_recording_error_reads_nothing_and_the_next_check_raises(sync: str) -> None:
    """A wrong feature size observed into ``"extra"``: the step goes on without reading (penalty 0) and
    the next ``check()`` raises a ``RecordingError`` naming the step and the slot."""
    good: Callable[[Tensor], Tensor] = torch.sigmoid
    t = make_trainer(sync, extra=good)
    data = batches(5, seed=1)
    for x, mask in data[:2]:
        t.step(x, mask)

    def wrong_features(y: Tensor) -> Tensor:  # EXPERTS + 1 features into a slot that has EXPERTS
        return torch.cat([y, y.narrow(-1, 0, 1)], dim=-1)

    t.extra = wrong_features
    with host_reads_raise() as log:
        t.step(*data[2])  # step 3: recording fails; the step goes on (penalty 0) without reading
    assert not log, "the failing step read tensor values on the host:\n" + "\n".join(log)
    with pytest.raises(actreg.RecordingError, match=r"step 3: 'extra': .*5 features, earlier ones had 4"):
        t.reg.check()

    t.extra = good
    t.step(*data[3])  # step 4 is fine
    t.extra = wrong_features
    with profiled() as ops:
        t.step(*data[4])  # step 5 fails again, profiled this time
    assert not ops, "the failing step ran ops that read the device:\n" + "\n".join(ops)
    with pytest.raises(actreg.RecordingError, match=r"step 5: 'extra'"):
        t.reg.check()
    t.reg.check()  # raised once, then cleared


class RowMean(actreg.Penalty):
    """A user penalty that implements only ``statistics(rows)``: with a mask it gets ``x[mask]`` rows
    (the documented exception to "masks never index"), so a masked step must trip both detectors."""

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def statistic_shapes(self, d: int) -> dict[str, tuple[int, ...]]:
        return {"sum": (d,), "count": ()}

    def statistics(self, x: Tensor) -> dict[str, Tensor]:
        return {"sum": x.sum(0), "count": actreg.count_of(x)}

    def value(self, s: Mapping[str, Tensor]) -> Tensor:
        return self.weight * (s["sum"] / actreg.nonzero(s["count"])).square().sum()


def test_detectors_fire_on_a_step_that_reads() -> None:
    """Both detectors see a boolean-indexed user penalty, an ``item()`` and a ``tolist()``."""
    torch.manual_seed(0)
    model = Tagger()
    reg = actreg.ActivityRegularizer(model, {"act": RowMean(1.0)})
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    t = Trainer(model, reg, opt)
    data = batches(4)
    t.step(*data[0])
    t.step(*data[1])
    with host_reads_raise() as log:
        t.step(*data[2])
        x = data[2][0]
        for read in (x.tolist, x.sum().item, lambda: bool(x.sum() > 0), lambda: float(x.sum())):
            with pytest.raises(HostRead):
                read()
    assert any("boolean-mask indexing" in r and "positions.py" in r for r in log), log
    for name in ("tolist", "item", "__bool__", "__float__"):
        assert any(r.startswith(f"Tensor.{name} ") for r in log), (name, log)
    # the read raised inside a forward hook, where actreg turns exceptions into recording errors:
    # that is why host_reads_raise() also keeps a log
    with pytest.raises(actreg.RecordingError, match="HostRead"):
        reg.check()
    with profiled() as ops:
        t.step(*data[3])
        data[3][0].sum().item()
    assert any(r.startswith("aten::nonzero") for r in ops), ops
    assert any(r.startswith("aten::index") for r in ops), ops
    assert any(r.startswith("aten::_local_scalar_dense") for r in ops), ops


# ====================================================================== 2. saved bytes under bf16 autocast
SB_IN, SB_OUT = 32, 16
#: ``[batch, time, features]`` of the regularized activation: 512 positions, and a short batch of 16
#: positions (where a fixed per-feature overhead -- ``4 d`` bytes of float32 statistics -- is 12.5 % of
#: a bf16 activation's ``2 n d`` bytes: the bound must hold at any batch size)
SHAPES = {"512 positions": (16, 32, 64), "16 positions": (2, 8, 256)}
#: share of the regularized activation's bytes that actreg may add to what the model saves anyway
SLACK = 0.05


@dataclass
class SavedBytes:
    """What autograd saves for backward inside :meth:`hooks`: distinct storages, their sizes, and for
    each the actreg line (if any) that saved it first."""

    storages: dict[int, tuple[int, str]]

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        def pack(t: Tensor) -> Tensor:
            storage = t.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in self.storages:
                where = next(
                    (
                        f"{f.filename[len(_SRC) + 1 :]}:{f.lineno} ({f.line})"
                        for f in reversed(traceback.extract_stack())
                        if f.filename.startswith(_SRC)
                    ),
                    "",
                )
                what = f"{storage.nbytes()} bytes ({t.dtype}, {tuple(t.shape)}) saved at {where}"
                self.storages[storage.data_ptr()] = (storage.nbytes(), what if where else "")
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield

    @property
    def total(self) -> int:
        return sum(n for n, _ in self.storages.values())

    def by_actreg(self) -> str:
        """Storages that actreg's code saved first (not already saved by the model), largest first."""
        rows = sorted((v for v in self.storages.values() if v[1]), reverse=True)
        return "\n".join(f"  {what}" for _, what in rows) or "  (none)"


def saved_bytes_of(step: Callable[[], Tensor]) -> SavedBytes:
    """What is saved for backward while ``step`` builds its graph (then runs backward: the graph works)."""
    saved = SavedBytes({})
    with saved.hooks():
        loss = step()
    loss.backward()
    return saved


def mlp_and_input(shape: tuple[int, int, int]) -> tuple[nn.Sequential, Tensor]:
    """``Linear -> ReLU -> Linear`` on ``[batch, time, features]``: ReLU saves its output, which is also the
    input the second Linear saves, so module "1"'s output is kept by the model and module "0"'s is not."""
    torch.manual_seed(0)
    batch, time, width = shape
    model = nn.Sequential(nn.Linear(SB_IN, width), nn.ReLU(), nn.Linear(width, SB_OUT))
    return model, torch.randn(batch, time, SB_IN)


def forward(model: nn.Module, x: Tensor, outputs: dict[str, Tensor], slot: str) -> Tensor:
    """The task loss under bf16 autocast; ``outputs[slot]`` is set to module ``slot``'s output."""
    handle = dict(model.named_modules())[slot].register_forward_hook(
        lambda m, a, out: outputs.__setitem__(slot, out)
    )
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x).float().sum()
    finally:
        handle.remove()


@dataclass
class Measured:
    without: int  #: bytes saved by the model alone
    with_reg: SavedBytes  #: saved by the model and actreg
    act: int  #: bytes of the regularized activation

    @property
    def added(self) -> int:
        return self.with_reg.total - self.without


def measure(make_penalty: Callable[[], actreg.Penalty], slot: str, shape: tuple[int, int, int]) -> Measured:
    """Saved bytes of one step without actreg and with it (the regularizer built inside the hooks)."""
    model, x = mlp_and_input(shape)
    outputs: dict[str, Tensor] = {}
    without = saved_bytes_of(lambda: forward(model, x, outputs, slot)).total
    reg: actreg.ActivityRegularizer | None = None

    def with_actreg() -> Tensor:
        nonlocal reg
        reg = actreg.ActivityRegularizer(model, {slot: make_penalty()})
        task = forward(model, x, outputs, slot)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return task + reg.loss()

    with_reg = saved_bytes_of(with_actreg)
    act = outputs[slot]
    assert act.dtype == torch.bfloat16, f"the regularized activation is {act.dtype}, not bfloat16"
    assert reg is not None and reg.metrics()[f"{slot}/{make_penalty().name}"] > 0
    reg.remove()
    return Measured(without, with_reg, act.untyped_storage().nbytes())


PENALTIES: dict[str, Callable[[], actreg.Penalty]] = {
    "L1": lambda: actreg.L1(1e-3),
    "L2": lambda: actreg.L2(1e-3),
    "AR": lambda: actreg.AR(1e-3),
    "TAR": lambda: actreg.TAR(1e-3, time_dim=1),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", list(PENALTIES))
def test_saved_bytes_under_bf16_autocast(name: str, shape: str) -> None:
    """The regularized activation (ReLU output) is kept by the model: actreg adds at most 5 % of it."""
    m = measure(PENALTIES[name], "1", SHAPES[shape])
    added, bound = m.added, SLACK * m.act
    assert added <= bound, (
        f"{name}, {shape}: actreg adds {added} saved bytes to the model's {m.without} for a bf16 "
        f"activation of {m.act} bytes that the model keeps anyway (bound {SLACK:.0%}: {bound:.0f} "
        f"bytes). Saved first by actreg's code:\n{m.with_reg.by_actreg()}"
    )


@pytest.mark.parametrize("name", list(PENALTIES))
def test_saved_bytes_of_an_activation_the_model_does_not_keep(name: str) -> None:
    """Module "0"'s output (the ReLU keeps its own output, not its input): actreg must save that
    activation itself (``sign(x)``, ``x`` and the differences are needed in backward) and nothing else."""
    m = measure(PENALTIES[name], "0", SHAPES["512 positions"])
    added, bound = m.added, (1 + SLACK) * m.act
    assert added <= bound, (
        f"{name}: actreg adds {added} saved bytes for a bf16 activation of {m.act} bytes that only it "
        f"keeps (bound: the activation + {SLACK:.0%} = {bound:.0f} bytes). Saved first by actreg's "
        f"code:\n{m.with_reg.by_actreg()}"
    )


def test_saved_bytes_bound_fails_for_a_naive_regularizer() -> None:
    """``x.float().abs().sum()`` from a forward hook saves a float32 copy: >= 100 % more, over the bound."""
    model, x = mlp_and_input(SHAPES["512 positions"])
    outputs: dict[str, Tensor] = {}
    without = saved_bytes_of(lambda: forward(model, x, outputs, "1")).total
    penalties: list[Tensor] = []
    handle = model[1].register_forward_hook(lambda m, a, out: penalties.append(out.float().abs().sum()))

    def naive() -> Tensor:
        task = forward(model, x, outputs, "1")
        return task + 1e-3 * penalties.pop()

    with_naive = saved_bytes_of(naive).total
    handle.remove()
    act = outputs["1"].untyped_storage().nbytes()
    added = with_naive - without
    assert added >= act, (added, act)
    assert added > SLACK * act  # what test_saved_bytes_under_bf16_autocast would report


# ====================================================================== 3. masks without indexing
def masked_batch(seed: int) -> tuple[Tensor, Tensor]:
    """float64 ``[batch, time, IN]`` and a ragged padding mask (one sequence entirely padding)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, TIME, IN, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, TIME + 1, (BATCH,), generator=g)
    mask = torch.arange(TIME).unsqueeze(0) < lengths.unsqueeze(1)
    mask[-1] = False
    mask[0] = True
    return x, mask


MASKED: dict[str, list[actreg.Penalty]] = {
    "act": [actreg.L1(0.7), actreg.VarianceFloor(1.1, gamma=0.6, eps=1e-4), actreg.TAR(1.7, time_dim=1)],
    "router": [actreg.LoadBalance(EXPERTS, 2, 0.9), actreg.ZLoss(0.05)],
}


def reference_values(act: Tensor, logits: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """The published formulas on the kept rows, selected by boolean indexing (float64)."""
    x = act[mask]  # [m, HIDDEN]
    r = logits[mask]  # [m, EXPERTS]
    m = x.shape[0]
    diff = act[:, 1:] - act[:, :-1]
    pairs = diff[mask[:, 1:] & mask[:, :-1]]  # differences whose two positions are kept
    top = torch.topk(r, 2, dim=-1).indices
    f = torch.stack([(top == e).sum() for e in range(EXPERTS)]).to(r.dtype) / (m * 2)
    return {
        "act/L1": 0.7 * x.abs().sum() / m,
        "act/VarianceFloor": 1.1 * torch.relu(0.6 - torch.sqrt(x.var(0) + 1e-4)).mean(),
        "act/TAR": 1.7 * pairs.pow(2).mean(),
        "router/LoadBalance": 0.9 * EXPERTS * (f * torch.softmax(r, -1).mean(0)).sum(),
        "router/ZLoss": 0.05 * torch.logsumexp(r, -1).pow(2).mean(),
    }


def test_masked_step_uses_no_indexing_and_matches_boolean_indexed_reference() -> None:
    """Ragged padding (one sequence all padding): no nonzero/index op in forward, loss or backward, and
    values and gradients equal the boolean-indexed float64 reference to 1e-10."""
    torch.manual_seed(0)
    model = Tagger().double()
    reg = actreg.ActivityRegularizer(model, MASKED)
    x0, mask0 = masked_batch(1)
    with reg.mask(mask0):
        model(x0)
    reg.loss().backward()  # the first loss() agrees on the layout (and may read): not measured
    model.zero_grad()

    x, mask = masked_batch(2)
    with profiled() as ops:
        with reg.mask(mask):
            model(x)
        loss = reg.loss()
        loss.backward()
    assert not ops, "a masked step ran reading or indexing ops:\n" + "\n".join(ops)
    got = reg.metrics()
    grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    act = model.act(model.embed(x))
    logits = model.router(model.gate(model.proj(act)))
    ref = reference_values(act, logits, mask)
    total = sum(ref.values())
    assert isinstance(total, Tensor)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value.item(), rel=1e-10), key
    assert got["act/count"] == mask.sum().item()
    assert loss.item() == pytest.approx(total.item(), rel=1e-10)
    total.backward()
    for p, g in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-14)
