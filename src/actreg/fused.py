"""Fused statistics kernels: one generated kernel per recorded activation in forward, one in backward.

The eager statistics of :class:`actreg.statistics.FusedStatistics` take one element-wise pass per
statistic (``|x|``, its sum, its sign, the per-unit counts, ``x^2``, its sum, ...) and, in
backward, one per term. Each pass over an activation costs about as much as the next, so the
floor is one read of ``x`` in forward and one pass in backward. This module writes the same maths
as two functions of plain torch ops and has inductor (``torch.compile``'s compiler: C++ on a CPU,
Triton on a GPU) turn each into one kernel:

- :func:`forward_math` -- from one read of the activation ``x`` ``[n, d]`` (its position mask
  ``keep`` ``[n]`` and the slot's shift ``c`` ``[d]`` when present), the slot's block up to the Gram
  matrix: ``count, sum|x|, sum x^2 | active[d] | sum[d]? | csum[d]? | csq[d]?`` (per-unit column
  reductions, summed over units for the three totals), in the accumulation dtype; and, when the slot
  wants the Gram matrix and its rows differ from ``x`` (a shift, a mask or another dtype), the
  centred rows ``x - c`` (masked rows 0) for the ``d x d`` product, which stays a matmul.
- :func:`backward_math` -- the gradient of ``x`` from the gradient of the block, in one pass:
  ``g_abs sign(x) + 2 g_sq x + g_sum + g_csum + 2 g_csq (x - c) + 2 (x - c) G`` (the Gram term
  ``(x - c) G`` from a matmul computed before), NaN set to 0 where a term multiplies ``x``
  (infinities kept, see ``statistics._zero_nan_``), masked positions 0, cast to ``x``'s dtype.

A regularized module's output is returned through the statistics' node
(``statistics.FusedThrough``, a view of the output): its backward receives the downstream gradient
and returns it with the statistics' term added by the same kernel, so autograd has no separate
gradient of the activation to add in a pass of its own.

A module output that is unmasked and uncentred takes a fast path from its second recording with
agreed sizes on (``statistics.KernelThrough``): both kernels are bound to the slot once, and the
hook calls the forward kernel with no lookup, no shift and no per-call decision (about 30 µs per
128 x 512 layer on a 2-core CPU, the kernel's 15 included); anything that differs -- a new shape,
a second call in the step, a mask, a new layout or loaded state, tracing -- takes the full path.
The step's penalty values, too, become two generated kernels when the layout has at most
``values.COMPILED_READS`` differentiated values (:mod:`actreg.compiled_values`).

Each kernel is traced once with symbolic sizes (``make_fx``) and compiled with
``torch._inductor.standalone_compile``: one kernel serves every number of positions (a new batch
size does not recompile), and it is called without dynamo's per-call machinery. Kernels are cached
per (block layout, dtype, accumulation dtype, device, mask or not, shift or not) for the process;
inductor's own on-disk cache makes a second process compile faster.

Penalties that record their own statistics (``TAR``'s differences, the routers' softmax/sigmoid,
top-k counts and logsumexp, user penalties) still do so with eager ops, next to the fused block
(which then only feeds the activity metrics).

Under ``torch.compile`` of a whole model the same maths functions are traced inline into the
model's graph (no separate kernel is called; inductor fuses them with their neighbours).

Fallback and opt-out: the eager code of ``statistics.FusedStatistics`` runs when this torch has no
``standalone_compile``, when compiling a kernel fails (a warning, once per kernel; e.g. no C++
compiler), for layouts the kernels do not cover (the Gram matrix sent as rows, fewer than 2
positions or units, a non-contiguous activation; and, outside ``torch.compile``, a slot with a
Gram matrix: its two matmuls dominate, and separate kernels around them measured no faster than
the eager statistics) and whenever fused kernels are not asked for. They are **opt-in**:
``ActivityRegularizer(..., fused=True)``, or the environment variable ``ACTREG_FUSED=1`` (read when a
regularizer is built without ``fused=``). Measured on a 2-core CPU they save about a fifth of the
eager ``L1`` overhead (``benchmarks/README.md``) at the price of seconds of compilation per layout in
every new process, and they have not run on a GPU yet: the eager statistics stay the default.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .statistics import BlockSpec

#: environment variable: ``0`` / ``false`` / ``off`` turns fused kernels off by default
ENV = "ACTREG_FUSED"
_ON = ("1", "true", "on", "yes")

Kernel = Callable[..., tuple[Tensor, ...]]
_Key = tuple[object, ...]

_lock = threading.Lock()
_kernels: dict[_Key, Kernel | None] = {}  #: None: compiling failed, use the eager code
#: seconds spent compiling, per kernel key (for benchmarks: first-use cost)
compile_seconds: dict[_Key, float] = {}


def default_enabled() -> bool:
    """Whether a regularizer built without ``fused=`` uses fused kernels: only when ``ACTREG_FUSED``
    is ``1`` (opt-in: the kernels compile for seconds on first use, and they are not yet measured
    on a GPU)."""
    return os.environ.get(ENV, "0").strip().lower() in _ON


def available() -> bool:
    """Whether this torch can compile fused kernels (``torch._inductor.standalone_compile``).

    Imports inductor (seconds): asked when the first kernel is built, not before."""
    try:
        import torch._inductor as inductor
    except Exception:  # pragma: no cover - a torch without inductor
        return False
    return hasattr(inductor, "standalone_compile")


def describe() -> str:
    """One line: whether fused kernels are on by default here, and what was compiled so far."""
    ok = available()
    state = "on" if default_enabled() and ok else "off"
    why = "" if ok else " (this torch has no torch._inductor.standalone_compile)"
    if not default_enabled():
        why = f" ({ENV}={os.environ.get(ENV, 'unset')}; opt in with {ENV}=1 or fused=True)"
    done = [k for k, v in _kernels.items() if v is not None]
    seconds = sum(compile_seconds.values())
    return f"{state}{why}; {len(done)} kernels compiled in this process, {seconds:.1f} s"


def clear() -> None:
    """Forget every compiled kernel (tests)."""
    with _lock:
        _kernels.clear()
        compile_seconds.clear()


# ---------------------------------------------------------------------------------------- maths
def forward_math(
    x: Tensor,
    keep: Tensor | None,
    shift: Tensor | None,
    spec: BlockSpec,
    acc: torch.dtype,
    rows_out: bool,
) -> tuple[Tensor, ...]:
    """The block of ``x`` ``[n, d]`` up to its Gram matrix, and (``rows_out``) the centred rows.

    ``keep``: ``[n]`` bool or None; ``shift``: ``[d]`` in ``acc`` or None. Computes, in ``acc``,
    with ``xm`` = ``x`` with masked rows set to 0 and ``xc`` = ``x - shift`` likewise:
    ``count`` (kept rows), ``sum |xm|``, ``sum xm^2``, ``active_j = #{i : |xm_ij| > threshold}``,
    then as the spec wants ``sum_i xm_ij``, ``sum_i xc_ij``, ``sum_i xc_ij^2`` -- all as column
    reductions over the rows (one read of ``x``), the totals as sums of their columns.
    """
    n = x.shape[0]
    xa = x.to(acc)
    k = None if keep is None else keep.unsqueeze(-1)
    xm = xa if k is None else torch.where(k, xa, 0.0)
    magnitude = xm.abs()
    abs_col = magnitude.sum(0)
    sq_col = (xm * xm).sum(0)
    active = (magnitude > spec.threshold).to(acc).sum(0)
    if keep is None:
        count = torch.full((1,), n, dtype=acc, device=x.device)
    else:
        count = keep.to(acc).sum().reshape(1)
    pieces = [count, abs_col.sum().reshape(1), sq_col.sum().reshape(1), active]
    wanted = spec.wanted
    if "sum" in wanted:
        pieces.append(xm.sum(0))
    xc: Tensor | None = None
    if spec.centred:
        xc = xa if shift is None else xa - shift
        if k is not None:
            xc = torch.where(k, xc, 0.0)
        if "csum" in wanted:
            pieces.append(xc.sum(0))
        if "csq" in wanted:
            pieces.append((xc * xc).sum(0))
    head = torch.cat(pieces)
    if rows_out:
        assert xc is not None
        return head, xc
    return (head,)


def backward_math(
    x: Tensor,
    keep: Tensor | None,
    shift: Tensor | None,
    grad: Tensor,
    gram: Tensor | None,
    spec: BlockSpec,
    acc: torch.dtype,
    incoming: Tensor | None = None,
) -> Tensor:
    """``d block / d x`` applied to ``grad`` (the block's gradient), for ``x`` ``[n, d]``, plus
    ``incoming`` (``[n, d]``, the gradient of the module output passed through) if given.

    ``gx = g_abs sign(x) + 2 g_sq x + g_sum + g_csum + 2 g_csq (x - c) + 2 gram`` over the
    differentiated primitives (``gram`` = ``(x - c) G``, computed by a matmul before, ``G`` the
    Gram entries' gradient: symmetric for the built-in penalties), NaN set to 0 when a term
    multiplies ``x``, masked rows 0, in ``x``'s dtype. One pass over ``x`` (and ``gram``).
    """
    d, at, diff = spec.d, spec.offsets, spec.differentiated
    xa = x.to(acc)
    gx: Tensor | None = None

    def add(term: Tensor) -> None:
        nonlocal gx
        gx = term if gx is None else gx + term

    if "abs_sum" in diff:
        add(torch.sign(xa) * grad[1])
    if "sq_sum" in diff:
        add(xa * (2 * grad[2]))
    if "sum" in diff:
        add(grad[at["sum"] : at["sum"] + d])
    xc = xa if shift is None else xa - shift
    if "csum" in diff:
        add(grad[at["csum"] : at["csum"] + d])
    if "csq" in diff:
        add(xc * (2 * grad[at["csq"] : at["csq"] + d]))
    if gram is not None:
        add(gram * 2)
    assert gx is not None
    if diff & {"sq_sum", "csq", "couter"}:
        # NaN -> 0, infinities kept: as nan_to_num(nan=0, posinf=inf, neginf=-inf), whose NaN test
        # inductor's C++ backend runs element by element; gx != gx is one vector compare
        gx = torch.where(gx != gx, 0.0, gx)
    if keep is not None:
        gx = torch.where(keep.unsqueeze(-1), gx, 0.0)
    elif gx.shape != x.shape:
        gx = gx.expand(x.shape)
    if incoming is not None:
        gx = gx + incoming.to(acc)
    return gx.to(x.dtype)


# -------------------------------------------------------------------------------------- kernels
def _examples(
    spec: BlockSpec, dtype: torch.dtype, acc: torch.dtype, device: torch.device, masked: bool, shifted: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    # a number of rows that no other size of the kernel's inputs equals -- the units ``d`` and the
    # block's size (the backward's gradient input): sizes that coincide share a symbol, and the
    # kernel would then assume rows == units or rows == block size (found by the soak with fused
    # kernels: a block of 7 values met the 7 example rows) -- and >= 2 (0 and 1 are specialised)
    d = spec.d
    n = next(m for m in (7, 11, 13, 17, 19) if m not in (d, spec.size))
    # (values do not matter for tracing; no random numbers: the user's generator is left alone)
    x = torch.ones(n, d, device=device, dtype=dtype)
    keep = (torch.arange(n, device=device) % 3 != 1) if masked else None
    shift = torch.zeros(d, dtype=acc, device=device) if shifted else None
    return x, keep, shift


def _compile(fn: Callable[..., Any], example: list[Tensor], fixed: bool = False) -> Kernel:
    """``fn`` traced with symbolic sizes (``fixed``: with fake tensors of the example's sizes) and
    compiled by inductor: ``kernel(*tensors)`` returns the tuple of ``fn``'s outputs. Called
    straight through the generated module's ``call`` when that gives what the artifact gives on the
    example (it skips the artifact's per-call wrappers, tens of microseconds: the size of a kernel
    here), else through the artifact."""
    from torch._inductor import standalone_compile
    from torch.fx.experimental.proxy_tensor import make_fx

    # (fixed: the values' reads may gather with an index tensor of their own, a constant here)
    gm = make_fx(fn, tracing_mode="fake" if fixed else "symbolic", _allow_non_fake_inputs=fixed)(*example)
    shapes = "from_example_inputs" if fixed else "from_graph"
    artifact = standalone_compile(gm, list[Any](example), dynamic_shapes=shapes)  # type: ignore[arg-type]

    def wrapped(*args: Tensor) -> tuple[Tensor, ...]:
        out = artifact(*args)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    direct = _direct_call(artifact)
    if direct is None:
        return wrapped
    try:
        want, got = wrapped(*example), direct(*example)
        same = len(want) == len(got) and all(
            a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride() and torch.equal(a, b)
            for a, b in zip(want, got, strict=True)
        )
    except Exception:
        same = False
    return direct if same else wrapped


def _direct_call(artifact: Any) -> Kernel | None:
    """The generated module's ``call(list_of_inputs)`` inside a compiled artifact, or None."""
    try:
        from torch._inductor.output_code import CompiledFxGraph
    except Exception:  # pragma: no cover - another torch layout
        return None
    graph = _find(artifact, CompiledFxGraph)
    run = getattr(graph, "current_callable", None)
    if run is None:
        return None

    def direct(*args: Tensor) -> tuple[Tensor, ...]:
        return tuple(run(list(args)))

    return direct


def _find(root: object, kind: type, depth: int = 10) -> Any:
    """An object of type ``kind`` reachable from ``root`` through closures and attributes."""
    seen: set[int] = set()
    stack: list[tuple[object, int]] = [(root, 0)]
    while stack:
        obj, level = stack.pop()
        if id(obj) in seen or level > depth:
            continue
        seen.add(id(obj))
        if isinstance(obj, kind):
            return obj
        kids: list[object] = []
        for cell in getattr(obj, "__closure__", None) or ():
            try:
                kids.append(cell.cell_contents)
            except ValueError:  # an empty cell
                pass
        if isinstance(obj, (list, tuple)):
            kids.extend(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            kids.extend(vars(obj).values())
        for attr in ("__self__", "__wrapped__", "__func__"):
            if hasattr(obj, attr):
                kids.append(getattr(obj, attr))
        stack.extend((k, level + 1) for k in kids if k is not None)
    return None


def _get(key: _Key, build: Callable[[], Kernel]) -> Kernel | None:
    kernel = _kernels.get(key, False)
    if kernel is not False:
        return kernel  # type: ignore[return-value]
    with _lock:
        if key in _kernels:
            return _kernels[key]
        if not available():  # an older torch: the eager code, silently
            _kernels[key] = None
            return None
        start = time.perf_counter()
        try:
            with torch.no_grad():
                built: Kernel | None = build()
        except Exception as err:  # no C++ compiler, an unsupported op, ...: the eager code runs
            warnings.warn(
                f"actreg: compiling a fused statistics kernel failed ({type(err).__name__}: "
                f"{str(err)[:300]}); this slot uses the eager statistics instead. Set {ENV}=0 or pass "
                "ActivityRegularizer(..., fused=False) to skip the attempt.",
                RuntimeWarning,
                stacklevel=4,
            )
            built = None
        compile_seconds[key] = time.perf_counter() - start
        _kernels[key] = built
        return built


def forward_kernel(
    spec: BlockSpec, x: Tensor, keep: Tensor | None, shift: Tensor | None, acc: torch.dtype, rows_out: bool
) -> Kernel | None:
    """The compiled :func:`forward_math` for this layout (``kernel(x, [keep], [shift])``), or None."""
    masked, shifted = keep is not None, shift is not None
    key = ("forward", spec, x.dtype, acc, x.device, masked, shifted, rows_out)

    def build() -> Kernel:
        ex, k, s = _examples(spec, x.dtype, acc, x.device, masked, shifted)

        def fn(*args: Tensor) -> tuple[Tensor, ...]:
            it = iter(args)
            xx = next(it)
            kk = next(it) if masked else None
            ss = next(it) if shifted else None
            return forward_math(xx, kk, ss, spec, acc, rows_out)

        return _compile(fn, [t for t in (ex, k, s) if t is not None])

    return _get(key, build)


def backward_kernel(
    spec: BlockSpec,
    x: Tensor,
    keep: Tensor | None,
    shift: Tensor | None,
    grad: Tensor,
    gram: bool,
    acc: torch.dtype,
    incoming: Tensor | None = None,
) -> Kernel | None:
    """The compiled :func:`backward_math` (``kernel(x, [keep], [shift], grad, [gram],
    [incoming])``), or None."""
    masked, shifted = keep is not None, shift is not None
    inc = None if incoming is None else incoming.dtype
    key = ("backward", spec, x.dtype, acc, x.device, masked, shifted, gram, grad.dtype, inc)

    def build() -> Kernel:
        ex, k, s = _examples(spec, x.dtype, acc, x.device, masked, shifted)
        g = torch.ones(spec.size, dtype=grad.dtype, device=x.device)
        gr = torch.ones(ex.shape, dtype=acc, device=x.device) if gram else None
        gi = None if inc is None else torch.ones(ex.shape, dtype=inc, device=x.device)

        def fn(*args: Tensor) -> Tensor:
            it = iter(args)
            xx = next(it)
            kk = next(it) if masked else None
            ss = next(it) if shifted else None
            gg = next(it)
            gm = next(it) if gram else None
            gin = next(it) if inc is not None else None
            return backward_math(xx, kk, ss, gg, gm, spec, acc, gin)

        return _compile(fn, [t for t in (ex, k, s, g, gr, gi) if t is not None])

    return _get(key, build)


def call(kernel: Kernel, *args: Tensor | None) -> tuple[Tensor, ...]:
    """Call a compiled kernel with the given tensors (Nones left out): the tuple of its outputs."""
    return kernel(*(a for a in args if a is not None))
