"""CUDA checks (skipped without a GPU): device placement, bf16/fp16 autocast, GradScaler, float64
exactness."""

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


@pytest.mark.parametrize("sync", ["global", "ema", "local"])
def test_cuda_training_step_has_no_host_sync(sync):
    """After the first step (one-time agreement), a step never waits for the device.

    ``torch.cuda.set_sync_debug_mode("error")`` raises on any synchronising CUDA call (``.item()``,
    ``.tolist()``, ``nonzero``, boolean indexing, a blocking copy to the host, ...).
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Sigmoid(), nn.Linear(32, 4)).cuda()
    penalties = {
        "1": [
            actreg.L1(1e-2),
            actreg.L2(1e-2),
            actreg.AR(1e-2),
            actreg.TAR(1e-2, time_dim=1),
            actreg.KLSparsity(0.1, 1e-2),
            actreg.DeCov(1e-2),
            actreg.VarianceFloor(1.0),
            actreg.Covariance(1e-2),
        ],
        "2": [actreg.LoadBalance(4, 2, 1e-2), actreg.ZLoss(1e-3)],
    }
    reg = actreg.ActivityRegularizer(model, penalties, sync=sync)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = torch.randn(16, 6, 8, device="cuda")
    mask = torch.rand(16, 6, device="cuda") > 0.2

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with reg.mask(mask):
            out = model(x)
        (out.square().mean() + reg.loss()).backward()
        opt.step()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    m = reg.metrics()
    assert all(v == v for v in m.values()) and m["total"] > 0


def test_cuda_bf16_saved_memory_is_the_activation_only():
    """Under bf16 autocast, L1 on an activation the model keeps anyway adds (almost) nothing to what
    autograd saves: no float32 copy of the activation."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)).cuda()
    x = torch.randn(512, 256, device="cuda")

    def saved_bytes(with_reg: bool) -> int:
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
            return t

        reg = actreg.ActivityRegularizer(model, {"1": actreg.L1(1e-3)}) if with_reg else None
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(x)
            loss = out.float().square().mean() + (reg.loss() if reg is not None else 0.0)
        loss.backward()
        if reg is not None:
            reg.remove()
        return sum(storages.values())

    activation = 512 * 256 * 2
    assert saved_bytes(True) - saved_bytes(False) <= 0.05 * activation


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_autocast_values_and_activation_gradients_match_float64(dtype):
    """tests/test_amp.py's autocast check on the GPU: every kind of built-in penalty."""
    import test_amp

    test_amp.check_autocast(dtype, "cuda")


def test_cuda_grad_scaler_fp16_updates_equal_unscaled_and_float64():
    """tests/test_amp.py's GradScaler check with ``torch.amp.GradScaler("cuda")``."""
    import test_amp

    test_amp.check_grad_scaler("cuda")
