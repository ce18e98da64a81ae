"""CUDA checks (skipped without a GPU): device placement, bf16 autocast, float64 exactness."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import actreg
import reference
from problem import CASES, batch, make_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("name", list(CASES))
def test_cuda_float64_matches_reference(name):
    src, pattern = CASES[name]
    model = make_model().cuda()
    reg = actreg.ActivityRegularizer(model, {pattern: eval(src, vars(actreg))})
    x, mask = batch(0)
    with reg.mask(mask.cuda()):
        model(x.cuda())
    loss = reg.loss()
    assert loss.device.type == "cuda"
    params = [p.detach().cpu().requires_grad_(True) for p in model.parameters()]
    ref = reference.direct(name, reference.activations(params, x, pattern), mask)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)


def test_cuda_bf16_autocast_statistics_in_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64)).cuda()
    reg = actreg.ActivityRegularizer(model, {"0": [actreg.DeCov(1.0), actreg.VarianceFloor(1.0)]})
    x = torch.randn(4096, 32, device="cuda") + 3.0
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h = model(x)
    assert h.dtype == torch.bfloat16
    loss = reg.loss()
    assert loss.dtype == torch.float32
    hd = h.double()
    c = torch.cov(hd.T, correction=0)
    decov = 0.5 * (c.pow(2).sum() - torch.diagonal(c).pow(2).sum())
    vf = torch.relu(1.0 - torch.sqrt(hd.var(0) + 1e-4)).mean()
    assert loss.item() == pytest.approx((decov + vf).item(), rel=1e-4)
