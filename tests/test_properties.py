"""Property-based tests (hypothesis) of the public API's parameters, shapes, dtypes and masks.

Every call either computes the right value -- the penalty and its gradient equal an independent
float64 evaluation of the published formula -- or raises a ``TypeError``/``ValueError`` (or, for
what is only known when an activation is recorded, a ``RecordingError``) that names what is wrong.
One process, no process group (``sync="global"`` then behaves as one rank). Examples are
derandomized, so every run (and CI) draws the same ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import actreg
import reference
from problem import CASES

SETTINGS = settings(max_examples=600, deadline=None, derandomize=True, database=None)
FEW = settings(max_examples=50, deadline=None, derandomize=True, database=None)

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
#: (value rtol, gradient rtol) per input dtype; statistics of low-precision inputs accumulate in
#: float32, a bfloat16 gradient is rounded to 8 bits
TOLERANCE = {torch.float64: (1e-9, 1e-9), torch.float32: (2e-4, 2e-4), torch.bfloat16: (2e-4, 2e-2)}
NAN = float("nan")
INF = float("inf")


# ---------------------------------------------------------------------- the float64 reference
def expected(kind: str, p: dict[str, Any], act: Tensor, keep: Tensor) -> Tensor:
    """The penalty of activation ``act`` (float64 ``[..., d]``) at kept positions ``keep``.

    Written from the formulas of the README, with torch.cov / Tensor.var / topk; nothing of actreg.
    """
    zero = torch.where(keep.unsqueeze(-1), act, 0.0).sum() * 0.0
    if kind == "TAR":
        td = p["time_dim"] % act.dim()
        a, k = act.movedim(td, 0), keep.movedim(td, 0)
        diff = (a[1:] - a[:-1])[k[1:] & k[:-1]]
        return p["beta"] * diff.pow(2).mean() if diff.numel() else zero
    x = act[keep]
    m, d = x.shape
    if m == 0:
        return zero
    if kind == "L1":
        return p["weight"] * x.abs().sum() / m
    if kind == "L2":
        return p["weight"] * x.pow(2).sum() / m
    if kind == "AR":
        return p["alpha"] * x.pow(2).mean()
    if kind == "ZLoss":
        return p["weight"] * torch.logsumexp(x, dim=-1).pow(2).mean()
    if kind == "KLSparsity":
        t, eps = p["target"], p["eps"]
        rho = x.mean(0).clamp(eps, 1 - eps)
        return p["weight"] * (t * torch.log(t / rho) + (1 - t) * torch.log((1 - t) / (1 - rho))).sum()
    if kind == "LoadBalance":
        k = p["top_k"]
        top = torch.topk(x, k, dim=-1).indices
        f = torch.stack([(top == e).sum() for e in range(d)]).to(x.dtype) / (m * k)
        return p["weight"] * d * (f * torch.softmax(x, dim=-1).mean(0)).sum()
    if kind == "DeCov":
        c = torch.cov(x.T, correction=0).reshape(d, d)
        return p["weight"] * 0.5 * (c.pow(2).sum() - torch.diagonal(c).pow(2).sum())
    if m < 2:
        return zero
    if kind == "VarianceFloor":
        return p["weight"] * torch.relu(p["gamma"] - torch.sqrt(x.var(0) + p["eps"])).mean()
    if kind == "Covariance":
        c = torch.cov(x.T).reshape(d, d)
        return p["weight"] * (c.pow(2).sum() - torch.diagonal(c).pow(2).sum()) / d
    raise KeyError(kind)


# ---------------------------------------------------------------------- strategies
weights = st.floats(0.0, 10.0)


@st.composite
def penalty_params(draw: st.DrawFn, kind: str, dims: int) -> dict[str, Any]:
    """Valid parameters of ``kind`` for an activation with ``dims`` dimensions."""
    if kind == "AR":
        return {"alpha": draw(weights)}
    if kind == "TAR":
        position_dims = [*range(-dims, -1), *range(dims - 1)]  # not -1 nor dims - 1: the features
        return {"beta": draw(weights), "time_dim": draw(st.sampled_from(position_dims))}
    if kind == "KLSparsity":
        return {
            "target": draw(st.floats(1e-3, 1 - 1e-3)),
            "weight": draw(weights),
            "eps": draw(st.floats(1e-8, 0.45)),
        }
    if kind == "VarianceFloor":
        gamma, eps = draw(st.floats(0.05, 4.0)), draw(st.floats(1e-6, 1.0))
        return {"weight": draw(weights), "gamma": gamma, "eps": eps}
    if kind == "LoadBalance":
        experts = draw(st.integers(1, 6))
        return {"num_experts": experts, "top_k": draw(st.integers(1, experts)), "weight": draw(weights)}
    return {"weight": draw(weights)}


KINDS = list(CASES)  # every built-in penalty


@dataclass
class Case:
    kind: str
    params: dict[str, Any]
    shape: tuple[int, ...]
    dtype: torch.dtype
    mask: str  # "none" | "full" | "trailing" (a [..., 1] mask) | "rows" (a [T] mask over [B, T, d])
    density: float  # fraction of kept positions; 0.0 masks everything
    padding: float  # what masked-out positions hold (NaN and inf included)
    seed: int


@st.composite
def cases(draw: st.DrawFn) -> Case:
    kind = draw(st.sampled_from(KINDS))
    dims = draw(st.sampled_from([2, 3]))
    params = draw(penalty_params(kind, dims))
    d = params["num_experts"] if kind == "LoadBalance" else draw(st.integers(1, 6))
    lead = tuple(draw(st.lists(st.integers(0, 7), min_size=dims - 1, max_size=dims - 1)))
    mask = draw(st.sampled_from(["none", "full", "trailing"] + (["rows"] if dims == 3 else [])))
    return Case(
        kind=kind,
        params=params,
        shape=(*lead, d),
        dtype=draw(st.sampled_from(DTYPES)),
        mask=mask,
        density=draw(st.sampled_from([0.0, 0.3, 0.7, 1.0])),
        padding=draw(st.sampled_from([0.0, 5.0, NAN, -INF])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def activation(case: Case, g: torch.Generator) -> Tensor:
    """Data for the penalty: [0, 1] values for KLSparsity, distinct logits for LoadBalance."""
    if case.kind == "KLSparsity":
        return torch.rand(case.shape, generator=g, dtype=torch.float64)
    if case.kind == "LoadBalance":  # distinct multiples of 1/2 per row: exact in bfloat16, no top-k ties
        d = case.shape[-1]
        keys = torch.rand((*case.shape[:-1], d), generator=g).argsort(-1).to(torch.float64)
        return (keys - d / 2) * 0.5
    scale = torch.empty(()).uniform_(0.1, 3.0, generator=g).item()
    offset = torch.empty(()).uniform_(-20.0, 20.0, generator=g).item()
    return torch.randn(case.shape, generator=g, dtype=torch.float64) * scale + offset


def mask_and_keep(case: Case, g: torch.Generator) -> tuple[Tensor | None, Tensor]:
    """The mask passed to actreg and the bool ``keep`` of every position it means."""
    positions = case.shape[:-1]
    if case.mask == "none":
        return None, torch.ones(positions, dtype=torch.bool)
    if case.mask == "rows":
        mask = torch.rand(positions[-1:], generator=g) < case.density
        return mask, mask.expand(positions)
    keep = torch.rand(positions, generator=g) < case.density
    return (keep.unsqueeze(-1) if case.mask == "trailing" else keep), keep


def make(kind: str, params: dict[str, Any]) -> actreg.Penalty:
    return getattr(actreg, kind)(**params)


def regularizer(*penalties: actreg.Penalty, **kwargs: Any) -> actreg.ActivityRegularizer:
    """A regularizer of the observed name ``"x"`` (the model is a stand-in: nothing is hooked)."""
    return actreg.ActivityRegularizer(nn.Linear(1, 1), {"x": list(penalties)}, observed=["x"], **kwargs)


# ---------------------------------------------------------------------- values and gradients
@SETTINGS
@given(cases())
def test_value_and_gradient_equal_the_float64_formula(case: Case) -> None:
    g = torch.Generator().manual_seed(case.seed)
    values = activation(case, g).to(case.dtype)  # the reference sees exactly the values actreg sees
    mask, keep = mask_and_keep(case, g)
    values = torch.where(keep.unsqueeze(-1), values, torch.tensor(case.padding, dtype=case.dtype))
    x = values.clone().requires_grad_(True)
    reg = regularizer(make(case.kind, case.params))
    reg.observe("x", x, mask)
    loss = reg.loss()
    reg.check()
    (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    grad = torch.zeros_like(x) if grad is None else grad

    x64 = values.to(torch.float64).requires_grad_(True)
    ref = expected(case.kind, case.params, x64, keep)
    (ref_grad,) = torch.autograd.grad(ref, x64, allow_unused=True)
    ref_grad = torch.zeros_like(x64) if ref_grad is None else ref_grad

    rtol, grad_rtol = TOLERANCE[case.dtype]
    assert torch.isfinite(loss) and bool(torch.isfinite(grad).all()), case
    if not keep.any():  # nothing kept: exactly 0, exactly no gradient
        assert loss.item() == 0.0 and bool((grad == 0).all()), case
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=rtol, atol=rtol * 1e-2, msg=repr(case))
    scale = ref_grad.abs().max().item() if ref_grad.numel() else 0.0
    weight = next(v for k, v in case.params.items() if k in ("weight", "alpha", "beta"))
    atol = grad_rtol * (scale + 1e-2 * weight) + 1e-12  # a gradient that is 0 in exact arithmetic
    torch.testing.assert_close(grad.double(), ref_grad, rtol=grad_rtol, atol=atol, msg=repr(case))
    assert bool((grad[~keep] == 0).all()), "masked-out positions get no gradient"


@pytest.mark.parametrize("kind", KINDS)
def test_reference_agrees_with_the_project_reference(kind: str) -> None:
    """The formulas above give tests/reference.py's values on its problem (same fixed parameters)."""
    act = torch.randn(7, 3, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    act = act.sigmoid() if kind == "KLSparsity" else act
    keep = torch.rand(7, 3, generator=torch.Generator().manual_seed(4)) > 0.3
    params = eval(CASES[kind][0], vars(actreg)).hyperparameters()
    want = reference.direct(kind, act, keep)
    torch.testing.assert_close(expected(kind, params, act, keep), want, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------- invalid parameters
SCALES = {  # penalty -> (its nonnegative scale parameter, the other arguments)
    "L1": ("weight", {}),
    "L2": ("weight", {}),
    "AR": ("alpha", {}),
    "TAR": ("beta", {}),
    "KLSparsity": ("weight", {"target": 0.1}),
    "DeCov": ("weight", {}),
    "VarianceFloor": ("weight", {}),
    "Covariance": ("weight", {}),
    "LoadBalance": ("weight", {"num_experts": 4, "top_k": 2}),
    "ZLoss": ("weight", {}),
}
negative = st.floats(max_value=0.0, exclude_max=True, allow_infinity=True, allow_nan=False)
not_finite = st.sampled_from([NAN, INF, -INF])
not_a_number = st.one_of(
    st.booleans(), st.none(), st.text(max_size=4), st.just(torch.tensor(1.0)), st.just([1.0]), st.just(1 + 0j)
)


def raises(error: type[Exception], call: Any, *names: str) -> str:
    """``call()`` raises ``error`` whose message names every string of ``names``; the message."""
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for name in names:
        assert name in message, (name, message)
    return message


@FEW
@given(st.sampled_from(sorted(SCALES)), st.one_of(negative, not_finite))
def test_negative_or_non_finite_weight_is_a_value_error(kind: str, bad: float) -> None:
    scale, others = SCALES[kind]
    message = raises(ValueError, lambda: make(kind, {scale: bad, **others}), kind, scale, ">= 0")
    assert repr(bad) in message


@FEW
@given(st.sampled_from(sorted(SCALES)), not_a_number)
def test_weight_that_is_not_a_number_is_a_type_error(kind: str, bad: object) -> None:
    scale, others = SCALES[kind]
    raises(TypeError, lambda: make(kind, {scale: bad, **others}), kind, scale, type(bad).__name__)


@FEW
@given(st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0), not_finite))
def test_kl_target_outside_the_open_unit_interval_is_a_value_error(bad: float) -> None:
    raises(ValueError, lambda: actreg.KLSparsity(target=bad, weight=1.0), "KLSparsity", "target", "(0, 1)")


@FEW
@given(
    st.sampled_from(["KLSparsity.eps", "VarianceFloor.eps", "VarianceFloor.gamma"]),
    st.one_of(st.floats(max_value=0.0), not_finite, st.floats(min_value=0.5)),
)
def test_eps_and_gamma_of_the_wrong_sign_are_value_errors(where: str, bad: float) -> None:
    kind, name = where.split(".")
    others = {"target": 0.1, "weight": 1.0} if kind == "KLSparsity" else {"weight": 1.0}
    if kind == "VarianceFloor" and math.isfinite(bad) and bad > 0:
        make(kind, {name: bad, **others})  # any positive finite gamma or eps is valid
        return
    raises(ValueError, lambda: make(kind, {name: bad, **others}), kind, name)


@FEW
@given(st.integers(-3, 8), st.integers(-3, 10))
def test_load_balance_top_k_and_num_experts(experts: int, top_k: int) -> None:
    call = lambda: actreg.LoadBalance(num_experts=experts, top_k=top_k, weight=1.0)  # noqa: E731
    if experts < 1:
        raises(ValueError, call, "LoadBalance", "num_experts", ">= 1")
    elif top_k < 1:
        raises(ValueError, call, "LoadBalance", "top_k", ">= 1")
    elif top_k > experts:
        raises(ValueError, call, "LoadBalance", f"top_k={top_k}", f"num_experts={experts}")
    else:
        penalty = call()
        assert (penalty.num_experts, penalty.top_k) == (experts, top_k)


@FEW
@given(
    st.sampled_from(["LoadBalance.num_experts", "LoadBalance.top_k", "TAR.time_dim"]),
    st.one_of(st.floats(), st.booleans(), st.text(max_size=3), st.none()),
)
def test_integer_parameters_reject_other_types(where: str, bad: object) -> None:
    kind, name = where.split(".")
    assume(not (name == "time_dim" and bad is None))  # TAR(time_dim=None): the default, batch-first
    others = {"num_experts": 4, "top_k": 2, "weight": 1.0} if kind == "LoadBalance" else {"beta": 1.0}
    raises(TypeError, lambda: make(kind, {**others, name: bad}), kind, name, "integer")


@FEW
@given(st.integers(1, 6), st.integers(1, 6))
def test_router_logits_of_another_width_are_refused_naming_the_layer(experts: int, d: int) -> None:
    reg = regularizer(actreg.LoadBalance(num_experts=experts, top_k=1, weight=1.0))
    reg.observe("x", torch.randn(5, d, dtype=torch.float64), None)
    reg.loss()
    if d == experts:
        reg.check()
        return
    raises(actreg.RecordingError, reg.check, "'x'", f"num_experts={experts}", f"{d} features")


@FEW
@given(st.one_of(st.floats(max_value=0.0, exclude_max=True), st.floats(min_value=1.0), not_finite))
def test_decay_outside_zero_one_is_a_value_error(bad: float) -> None:
    raises(ValueError, lambda: regularizer(actreg.L1(1.0), sync="ema", decay=bad), "decay")


@FEW
@given(st.floats(0.0, 1.0, exclude_max=True))
def test_decay_inside_zero_one_is_accepted(decay: float) -> None:
    assert regularizer(actreg.L1(1.0), sync="ema", decay=decay).decay == decay


# ---------------------------------------------------------------------- masks and activations
NON_BOOL = [torch.uint8, torch.int8, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32]


@FEW
@given(st.sampled_from(NON_BOOL), st.booleans(), st.integers(0, 4))
def test_mask_that_is_not_bool_is_a_type_error(dtype: torch.dtype, hooked: bool, n: int) -> None:
    """An attention mask of 1s and 0s is refused at the call; the regularizer stays usable."""
    x = torch.randn(n, 3, 2, dtype=torch.float64)
    keep = torch.arange(3).expand(n, 3) < 2
    attention = keep.to(dtype)
    model = nn.Sequential(nn.Identity())
    if hooked:
        reg = actreg.ActivityRegularizer(model, {"0": actreg.L1(1.0)})
        raises(TypeError, lambda: reg.mask(attention).__enter__(), "reg.mask", str(dtype), "mask.bool()")
        with reg.mask(attention.bool()):
            model(x)
    else:
        reg = regularizer(actreg.L1(1.0))
        call = lambda: reg.observe("x", x, attention)  # noqa: E731
        raises(TypeError, call, "reg.observe('x'", str(dtype), "mask.bool()")
        reg.observe("x", x, attention.bool())
    got = reg.loss()
    reg.check()
    want = x[keep].abs().sum() / max(int(keep.sum()), 1)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)


@pytest.mark.parametrize(
    "bad",
    [
        torch.ones(3, 2, dtype=torch.int64),
        torch.ones(3, 2, dtype=torch.complex64),
        torch.tensor(1.0),
        torch.ones(3, 0),
        torch.ones(2, 4, 0),
    ],
    ids=["integer", "complex", "scalar", "no-features", "no-features-3d"],
)
def test_activation_that_is_not_float_with_features_is_refused(bad: Tensor) -> None:
    reg = regularizer(actreg.L1(1.0))
    reg.observe("x", bad)
    reg.loss()
    raises(actreg.RecordingError, reg.check, "'x'", "floating tensor [..., features]", str(tuple(bad.shape)))
