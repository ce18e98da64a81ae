"""actreg.integrations without the frameworks: import isolation and the Hugging Face helpers.

The helpers of ``actreg.integrations.hf`` take plain tensors, so they are checked here against
Mixtral's load-balancing loss written from its definition, in float64, with or without the
``hf`` extra installed.
"""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import actreg
from actreg.integrations import hf


def test_importing_actreg_and_its_integrations_imports_no_framework() -> None:
    code = (
        "import sys, actreg, actreg.integrations.lightning, actreg.integrations.hf\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('lightning', 'pytorch_lightning', 'transformers', 'accelerate')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"


def mixtral_balance(
    layers: list[torch.Tensor], mask: torch.Tensor, num_experts: int, top_k: int
) -> torch.Tensor:
    """Mixtral's auxiliary loss (Switch eq. 4-6, every layer pooled, f_e not divided by top_k)."""
    keep = mask.reshape(-1).double()
    counts = torch.zeros(num_experts, dtype=torch.float64)
    probs = torch.zeros(num_experts, dtype=torch.float64)
    for logits in layers:
        p = torch.softmax(logits, dim=-1)
        chosen = torch.topk(p, top_k, dim=-1).indices
        counts = counts + (torch.nn.functional.one_hot(chosen, num_experts).sum(1) * keep[:, None]).sum(0)
        probs = probs + (p * keep[:, None]).sum(0)
    tokens = keep.sum() * len(layers)
    return num_experts * ((counts / tokens) * (probs / tokens)).sum()


def regularizer(config: SimpleNamespace) -> actreg.ActivityRegularizer:
    """A regularizer of router logits fed only through ``observe`` (the model is a placeholder)."""
    return actreg.ActivityRegularizer(
        torch.nn.Linear(1, 1), {"router": hf.load_balance(config)}, observed=["router"]
    )


def test_load_balance_of_pooled_layers_equals_mixtral() -> None:
    config = SimpleNamespace(num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02)
    g = torch.Generator().manual_seed(3)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    layers = [
        torch.randn(mask.numel(), 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)
    ]
    reg = regularizer(config)
    hf.observe_router_logits(reg, [layers[0], None, layers[1], layers[2]], mask)  # None: no router there
    value = reg.loss()
    want = 0.02 * mixtral_balance(layers, mask, 4, 2)
    assert value.item() == pytest.approx(want.item(), rel=1e-12)
    for got, ref in zip(torch.autograd.grad(value, layers), torch.autograd.grad(want, layers), strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-14)
    assert hf.load_balance(config, coef=0.5).weight == 1.0  # top_k * coef


def test_helpers_name_what_is_wrong() -> None:
    with pytest.raises(TypeError, match="has no num_experts_per_tok, router_aux_loss_coef"):
        hf.load_balance(SimpleNamespace(num_local_experts=4))
    config = SimpleNamespace(num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02)
    reg = regularizer(config)
    hf.observe_router_logits(reg, [torch.randn(12, 4)], torch.ones(3, 5))  # 15 positions for 12 rows
    reg.loss()
    with pytest.raises(actreg.RecordingError, match="router"):
        reg.check()
