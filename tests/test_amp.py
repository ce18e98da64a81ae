"""Mixed precision on CPU: bf16 and fp16 autocast, fp16 activations too large for fp16 sums, and
``torch.amp.GradScaler("cpu")`` (available in torch 2.13).

References are float64 and written from the penalties' formulas (tests/reference.py), evaluated on
the very low-precision activations the model produced -- so the only tolerance left is actreg's
float32 statistics (values) or the rounding of a gradient to the activation's dtype.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import actreg
import reference
from problem import CASES

#: per slot of TwoHeads, penalties of tests/problem.py (weights as in reference.direct)
SLOTS = {"act": ["L1", "VarianceFloor", "DeCov", "TAR", "KLSparsity"], "router": ["LoadBalance", "ZLoss"]}
#: relative rounding of one value in the activation's dtype (gradients are handed back in it)
ROUNDING = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


class TwoHeads(nn.Module):
    """``act`` (a [0, 1] hidden layer) and ``router`` (expert logits) both read the input, so the
    gradient reaching one does not flow through the other."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.act, self.router = nn.Linear(5, 6), nn.Sigmoid(), nn.Linear(5, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.hidden(x)).sum(-1, keepdim=True) + self.router(x)


def capture(model: nn.Module, names: list[str]) -> tuple[dict[str, Tensor], list]:
    """The outputs of ``model``'s submodules ``names``, kept by forward hooks of our own."""
    out: dict[str, Tensor] = {}
    modules = dict(model.named_modules())
    handles = [
        modules[n].register_forward_hook(lambda m, a, y, n=n: out.__setitem__(n, y)) for n in names
    ]
    return out, handles


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_values_and_activation_gradients_match_float64(dtype: torch.dtype) -> None:
    check_autocast(dtype, "cpu")


def check_autocast(dtype: torch.dtype, device: str) -> None:
    """Every kind of built-in penalty under ``dtype`` autocast on ``device`` (also run by test_cuda)."""
    torch.manual_seed(0)
    model = TwoHeads().to(device)
    penalties = {s: [eval(CASES[n][0], vars(actreg)) for n in names] for s, names in SLOTS.items()}
    reg = actreg.ActivityRegularizer(model, penalties)
    acts, handles = capture(model, list(SLOTS))
    x = (torch.randn(64, 3, 5) * 1.5).to(device)
    mask = (torch.rand(64, 3) > 0.3).to(device)
    with reg.mask(mask), torch.autocast(device, dtype=dtype):
        model(x)
    assert {a.dtype for a in acts.values()} == {dtype}  # the activations really are low precision
    loss = reg.loss()
    assert loss.dtype == torch.float32
    got = torch.autograd.grad(loss, [acts[s] for s in SLOTS])

    exact = {s: acts[s].detach().double().cpu().requires_grad_(True) for s in SLOTS}
    total = sum(reference.direct(n, exact[s], mask.cpu()) for s, names in SLOTS.items() for n in names)
    want = torch.autograd.grad(total, list(exact.values()))
    assert loss.item() == pytest.approx(total.item(), rel=1e-5)
    for s, g, w in zip(SLOTS, got, want, strict=True):
        assert g.dtype == dtype
        tol = {"rtol": 2 * ROUNDING[dtype], "atol": 2 * ROUNDING[dtype] * w.abs().max().item()}
        torch.testing.assert_close(g.double().cpu(), w, **tol, msg=lambda m, s=s: f"{s}: {m}")
    for h in handles:
        h.remove()


def test_fp16_activations_whose_sums_overflow_fp16_give_a_finite_exact_penalty() -> None:
    """Activations of scale 1e3 at d = 512 under fp16 autocast: every value fits fp16, but Σx² over 64
    rows (~3e10) is far beyond fp16's 65504 and a d x d Gram entry (~6e7) too. Statistics are float32,
    so every penalty is finite and equals float64, and so is the gradient handed back in fp16."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512))
    with torch.no_grad():
        model[0].weight.copy_(1e3 * torch.eye(512) + torch.randn(512, 512))
        model[0].bias.fill_(50.0)
    penalties = {
        "0": [
            actreg.L2(1e-9),
            actreg.AR(1e-6),
            actreg.DeCov(1e-12),
            actreg.VarianceFloor(1.0, gamma=2e3),
            actreg.Covariance(1e-12),
        ]
    }
    reg = actreg.ActivityRegularizer(model, penalties)
    acts, handles = capture(model, ["0"])
    with torch.autocast("cpu", dtype=torch.float16):
        model(torch.randn(64, 512))
    h = acts["0"]
    assert h.dtype == torch.float16 and torch.isfinite(h).all() and h.abs().max() > 2e3
    assert torch.isinf(h.pow(2).sum()) and torch.isinf(h.T @ h).any()  # what fp16 sums would give
    loss = reg.loss()
    (got,) = torch.autograd.grad(loss, [h])

    x = h.detach().double().requires_grad_(True)
    n, d = x.shape
    c_biased = torch.cov(x.T, correction=0)
    c = torch.cov(x.T)
    off = [m.pow(2).sum() - m.diagonal().pow(2).sum() for m in (c_biased, c)]
    total = (
        1e-9 * x.pow(2).sum() / n
        + 1e-6 * x.pow(2).mean()
        + 1e-12 * 0.5 * off[0]
        + torch.relu(2e3 - torch.sqrt(x.var(0) + 1e-4)).mean()
        + 1e-12 * off[1] / d
    )
    (want,) = torch.autograd.grad(total, [x])
    assert torch.isfinite(loss) and loss.item() == pytest.approx(total.item(), rel=1e-5)
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    tol = {"rtol": 4 * ROUNDING[torch.float16], "atol": 1e-3 * want.abs().max().item()}
    torch.testing.assert_close(got.double(), want, **tol)
    for handle in handles:
        handle.remove()


def updates(mode: str, device: str = "cpu", steps: int = 3) -> list[list[Tensor]]:
    """Per step, every parameter's update; ``mode``: "float64" (no actreg: the penalty by hand, on the
    CPU), "fp16" (actreg, fp16 autocast on ``device``) or "scaled" (the same with a ``GradScaler``)."""
    torch.manual_seed(0)
    device = "cpu" if mode == "float64" else device
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).to(device)
    if mode == "float64":
        model = model.double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    penalties = {"1": [actreg.L2(1e-3), actreg.DeCov(1e-2)]}
    reg = None if mode == "float64" else actreg.ActivityRegularizer(model, penalties)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**12, growth_interval=1000, enabled=mode == "scaled")
    g = torch.Generator().manual_seed(1)
    out_updates = []
    for _ in range(steps):
        x = torch.randn(48, 16, generator=g).to(device)
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        if reg is None:
            h = model[1](model[0](x.double()))
            c = torch.cov(h.T, correction=0)
            decov = 0.5 * (c.pow(2).sum() - c.diagonal().pow(2).sum())
            loss = model[2](h).square().mean() + 1e-3 * h.pow(2).sum() / h.shape[0] + 1e-2 * decov
        else:
            with torch.autocast(device, dtype=torch.float16):
                out = model(x)
            loss = out.float().square().mean() + reg.loss()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        after = [p.detach() for p in model.parameters()]
        out_updates.append([(a - b).double().cpu() for a, b in zip(after, before, strict=True)])
    if mode == "scaled":
        assert scaler.get_scale() == 2.0**12, "a step was skipped (inf/NaN gradient)"
    return out_updates


def test_grad_scaler_fp16_updates_equal_unscaled_and_float64() -> None:
    """``torch.amp.GradScaler("cpu")`` (works in torch 2.13) with fp16 autocast: the penalty's
    gradient is scaled with the task's and unscaled by the scaler like any other, so the scaled run's
    parameter updates equal the unscaled run's, and both equal float64, within fp16 rounding."""
    check_grad_scaler("cpu")


def check_grad_scaler(device: str) -> None:
    """Scaled vs unscaled vs float64 updates (also run by test_cuda)."""
    exact, fp16, scaled = updates("float64"), updates("fp16", device), updates("scaled", device)
    for step, (e, a, b) in enumerate(zip(exact, fp16, scaled, strict=True)):
        for i, (ue, ua, ub) in enumerate(zip(e, a, b, strict=True)):
            tol = {"rtol": 1e-2, "atol": 1e-2 * ue.abs().max().item()}
            where = f"step {step} param {i}"
            torch.testing.assert_close(ub, ua, **tol, msg=lambda m, w=where: f"scaled vs unscaled, {w}: {m}")
            torch.testing.assert_close(ua, ue, **tol, msg=lambda m, w=where: f"fp16 vs float64, {w}: {m}")
