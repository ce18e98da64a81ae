"""The recipes of docs/coming-from.md: each actreg spelling equals its source's formula.

Each source term is written here in float64 from its published definition (not through actreg,
nor tests/reference.py), and compared with actreg's value and gradient. One case runs on 2 ranks
(uneven shards) and checks that actreg's value is the source formula on the concatenated batch.
Every ```python block of docs/coming-from.md is executed, so the page cannot go stale.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import actreg

F64 = torch.float64
DOC = Path(__file__).resolve().parents[1] / "docs" / "coming-from.md"


def _leaf(*shape: int, seed: int, scale: Tensor | float = 1.0, shift: Tensor | float = 0.0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=F64) * scale + shift).requires_grad_()


def _observed(penalties: dict[str, Any]) -> actreg.ActivityRegularizer:
    """A regularizer fed through ``observe`` only (no process group: one process)."""
    return actreg.ActivityRegularizer(nn.Module(), penalties, observed=list(penalties))


def _value_and_grads(value: Tensor, leaves: Sequence[Tensor]) -> tuple[float, list[np.ndarray]]:
    grads = torch.autograd.grad(value, list(leaves), retain_graph=True)  # got and expected share inputs
    return value.item(), [g.numpy() for g in grads]


def _assert_same(got: Tensor, expected: Tensor, leaves: Sequence[Tensor]) -> None:
    """actreg's value and gradient w.r.t. ``leaves`` equal the source's (float64)."""
    v_got, g_got = _value_and_grads(got, leaves)
    v_exp, g_exp = _value_and_grads(expected, leaves)
    assert v_got == pytest.approx(v_exp, rel=1e-10, abs=1e-14)
    assert len(g_got) == len(g_exp)
    for a, b in zip(g_got, g_exp, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-13)


# --- Keras ------------------------------------------------------------------------------------


def test_keras_l1_activity_regularizer_on_sequences_is_l1_with_weight_times_t():
    B, T, d, lam = 5, 7, 4, 3e-3
    x = _leaf(B, T, d, seed=1)
    # Keras: l1(lam)(x) = lam * sum|x| over all elements; tf.keras divides by x.shape[0]
    keras = lam * torch.sum(torch.abs(x)) / x.shape[0]
    reg = _observed({"h": actreg.L1(lam * T)})
    reg.observe("h", x)
    _assert_same(reg.loss(), keras, [x])

    x2 = _leaf(B, d, seed=2)  # a 2-D output [B, d]: the weight is lam itself
    reg = _observed({"h": actreg.L1(lam)})
    reg.observe("h", x2)
    _assert_same(reg.loss(), lam * torch.sum(torch.abs(x2)) / x2.shape[0], [x2])


# --- AWD-LSTM ---------------------------------------------------------------------------------


def test_awd_lstm_ar_and_tar_on_time_major_output():
    T, B, d, alpha, beta = 9, 4, 5, 2.0, 1.0
    h = _leaf(T, B, d, seed=3)  # rnn_hs[-1], time-major
    g = torch.Generator().manual_seed(4)
    locked = (torch.rand(1, B, d, generator=g) > 0.3).to(F64) / 0.7  # one dropout mask for all t
    dropped = h * locked
    ar = alpha * torch.sum(dropped**2) / dropped.numel()  # alpha * mean(dropped_h^2)
    diffs = torch.stack([h[t] - h[t - 1] for t in range(1, T)])  # h[1:] - h[:-1], written out
    tar = beta * torch.sum(diffs**2) / ((T - 1) * B * d)
    reg = _observed({"dropped_h": actreg.AR(alpha), "h": actreg.TAR(beta, time_dim=0)})
    reg.observe("dropped_h", dropped)
    reg.observe("h", h)
    _assert_same(reg.loss(), ar + tar, [h])


def test_tar_without_time_dim_warns_once_at_its_first_3d_activation():
    h = torch.randn(6, 3, 4)
    tar = actreg.TAR(1.0)
    reg = _observed({"h": tar})
    with pytest.warns(UserWarning, match=r"no time_dim.*\(6, 3, 4\).*time_dim=0.*time_dim=1"):
        reg.observe("h", h)
    reg.loss()
    # not a setting: the same description (and layout fingerprint) as an explicit time_dim=1
    assert repr(tar) == repr(actreg.TAR(1.0, time_dim=1)) == "TAR(beta=1.0, time_dim=1)"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg.observe("h", h)  # once per penalty object
        reg.loss()
        for explicit in (actreg.TAR(1.0, time_dim=0), actreg.TAR(1.0, time_dim=1)):
            quiet = _observed({"h": explicit})
            quiet.observe("h", h)
            quiet.loss()
        two_d = _observed({"h": actreg.TAR(1.0)})  # [time, d]: nothing ambiguous to warn about
        two_d.observe("h", torch.randn(6, 4))
        two_d.loss()


# --- VICReg -----------------------------------------------------------------------------------


def _vicreg_v(z: Tensor, gamma: float = 1.0, eps: float = 1e-4) -> Tensor:
    """v(Z) = mean_j relu(gamma - sqrt(Var(z_j) + eps)), Var unbiased."""
    n = z.shape[0]
    mean = torch.sum(z, 0) / n
    var = torch.sum((z - mean) ** 2, 0) / (n - 1)
    return torch.mean(torch.clamp(gamma - torch.sqrt(var + eps), min=0.0))


def _vicreg_c(z: Tensor) -> Tensor:
    """c(Z) = (1/d) sum_{i != j} C_ij^2, C the covariance with n - 1."""
    n, d = z.shape
    zc = z - torch.sum(z, 0) / n
    cov = zc.T @ zc / (n - 1)
    off = cov * (1 - torch.eye(d, dtype=F64))
    return torch.sum(off**2) / d


def test_vicreg_variance_and_covariance_per_branch():
    n, d, mu, nu = 12, 6, 25.0, 1.0
    scale = torch.linspace(0.2, 2.5, d, dtype=F64)  # some units below the floor, some above
    z_a = _leaf(n, d, seed=5, scale=scale, shift=3.0)
    z_b = _leaf(n, d, seed=6, scale=scale.flip(0), shift=-1.0)
    official = mu * (_vicreg_v(z_a) + _vicreg_v(z_b)) / 2 + nu * (_vicreg_c(z_a) + _vicreg_c(z_b))
    reg = _observed({z: [actreg.VarianceFloor(mu / 2), actreg.Covariance(nu)] for z in ("z_a", "z_b")})
    reg.observe("z_a", z_a)
    reg.observe("z_b", z_b)
    _assert_same(reg.loss(), official, [z_a, z_b])

    paper = mu * (_vicreg_v(z_a) + _vicreg_v(z_b))  # the paper's formula: weight mu
    reg = _observed({z: actreg.VarianceFloor(mu) for z in ("z_a", "z_b")})
    reg.observe("z_a", z_a)
    reg.observe("z_b", z_b)
    _assert_same(reg.loss(), paper, [z_a, z_b])


def variance_on_uneven_shards(rank: int, world_size: int, rows: list[int], mu: float) -> dict[str, Any]:
    """(pool task) Each rank observes its rows of one global batch under VarianceFloor."""
    full = _leaf(sum(rows), 5, seed=7, scale=torch.linspace(0.3, 2.0, 5, dtype=F64), shift=2.0)
    start = sum(rows[:rank])
    shard = full.detach()[start : start + rows[rank]].clone().requires_grad_()
    reg = _observed({"z": actreg.VarianceFloor(mu / 2)})
    reg.observe("z", shard)
    loss = reg.loss()
    loss.backward()
    return {"value": loss.item(), "grad": shard.grad.numpy(), "world": world_size}


def test_vicreg_variance_on_two_uneven_shards_is_the_concatenated_batch_formula(pools):
    rows, mu = [3, 10], 25.0
    results = pools[2].run(variance_on_uneven_shards, rows, mu, timeout=120)
    full = _leaf(sum(rows), 5, seed=7, scale=torch.linspace(0.3, 2.0, 5, dtype=F64), shift=2.0)
    expected = mu / 2 * _vicreg_v(full)
    (grad,) = torch.autograd.grad(expected, [full])
    start = 0
    for rank, res in enumerate(results):
        assert res["value"] == pytest.approx(expected.item(), rel=1e-10)
        # the surrogate hands each rank W times its rows' gradient; DDP's averaging divides by W
        np.testing.assert_allclose(
            res["grad"] / res["world"], grad[start : start + rows[rank]].numpy(), rtol=1e-9, atol=1e-13
        )
        start += rows[rank]


# --- MoE load balancing -----------------------------------------------------------------------


def _one_hot(index: Tensor, num: int) -> Tensor:
    return (index.unsqueeze(-1) == torch.arange(num)).to(F64)


def test_switch_load_balance_is_the_pooled_batch_and_per_sequence_is_their_mean():
    B, S, E, alpha = 3, 10, 4, 0.01
    logits = _leaf(B, S, E, seed=8, scale=torch.linspace(0.5, 2.0, E, dtype=F64))
    probs = torch.softmax(logits, -1)
    expert_index = torch.argmax(probs, -1)  # top-1
    # Switch Transformer eq. 4 on all B * S tokens: alpha * E * sum_e f_e P_e
    f = torch.mean(_one_hot(expert_index, E).reshape(-1, E), 0)
    pooled = alpha * E * torch.sum(f * torch.mean(probs.reshape(-1, E), 0))
    reg = _observed({"router": actreg.LoadBalance(E, 1, alpha)})
    reg.observe("router", logits)
    _assert_same(reg.loss(), pooled, [logits])

    # Hugging Face SwitchTransformers: per-sequence f and P, E^2 * mean over (sequence, expert)
    per_group = torch.mean(_one_hot(expert_index, E), 1) * torch.mean(probs, 1)  # [B, E]
    hf = alpha * torch.mean(per_group) * E**2
    per_sequence = []
    for b in range(B):  # the per-group version: actreg's value of each sequence alone, averaged
        reg.observe("router", logits[b])
        per_sequence.append(reg.loss())
    _assert_same(torch.stack(per_sequence).mean(), hf, [logits])


def test_mixtral_load_balance_pools_layers_under_one_name_weight_times_top_k():
    layers, B, S, E, k, coef = 3, 2, 6, 6, 2, 0.02
    gate_logits = _leaf(layers, B * S, E, seed=9)  # outputs.router_logits, one [B*S, E] per layer
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    # Hugging Face load_balancing_loss_func: layers concatenated, masked means, no 1/top_k
    weights = torch.softmax(gate_logits.reshape(-1, E), -1)
    selected = torch.topk(weights, k, dim=-1).indices
    expert_mask = _one_hot(selected, E)  # [tokens, k, E]
    keep = attention_mask.reshape(-1).repeat(layers).to(F64)
    tokens_per_expert = torch.sum(expert_mask * keep[:, None, None], 0) / torch.sum(keep)
    router_prob_per_expert = torch.sum(weights * keep[:, None], 0) / torch.sum(keep)
    hf = coef * E * torch.sum(tokens_per_expert * router_prob_per_expert.unsqueeze(0))
    reg = _observed({"router": actreg.LoadBalance(E, k, coef * k)})
    for layer in range(layers):
        reg.observe("router", gate_logits[layer], mask=attention_mask.reshape(-1).bool())
    _assert_same(reg.loss(), hf, [gate_logits])


def test_megatron_load_balance_and_z_loss_per_router_layer():
    layers, T, E, k, c, z = 2, 12, 8, 2, 0.01, 0.003
    logits = _leaf(layers, T, E, seed=10, scale=2.0)
    megatron = torch.zeros((), dtype=F64)
    for layer in range(layers):  # one aux loss and one z-loss per MoE layer, summed
        probs = torch.softmax(logits[layer], -1)
        tokens_per_expert = torch.sum(_one_hot(torch.topk(probs, k, dim=-1).indices, E), (0, 1))
        aggregated = torch.sum(probs, 0)
        megatron = megatron + torch.sum(aggregated * tokens_per_expert) * (E * c / (k * T * T))
        megatron = megatron + z * torch.mean(torch.logsumexp(logits[layer], -1) ** 2)
    routers = nn.ModuleList(nn.Identity() for _ in range(layers))
    reg = actreg.ActivityRegularizer(routers, {"*": [actreg.LoadBalance(E, k, c), actreg.ZLoss(z)]})
    assert reg.slot_names == ["0", "1"]  # one slot per router
    for layer in range(layers):
        routers[layer](logits[layer])
    _assert_same(reg.loss(), megatron, [logits])


def test_megatron_global_aux_loss_router_gradient_is_one_over_dp_of_actreg(pools):
    """Megatron's ``global_aux_loss`` (counts all-reduced, probabilities local, loss added on each
    rank, DDP averaging) against actreg's ``LoadBalance`` at the same coefficient on 2 and 3 ranks:
    the values summed over the ranks are the same global loss, but Megatron's router gradient is
    1/DP of that loss's gradient (Megatron-LM issue #3672); actreg's is the gradient itself."""
    from dist_cases_coming_from import global_aux_loss_gradients, global_tokens, make_router

    tokens, E, k, c = 12, 4, 2, 0.01
    for world in (2, 3):
        results = pools[world].run(global_aux_loss_gradients, tokens, E, k, c, timeout=120)
        router = make_router(E)  # float64 on the concatenated global batch, one process
        probs = torch.softmax(router(global_tokens(0, 0, tokens)), -1)
        counts = torch.sum(_one_hot(torch.topk(probs, k, dim=-1).indices, E), (0, 1))
        f, P = counts / (tokens * k), torch.sum(probs, 0) / tokens
        expected = c * E * torch.sum(f * P)  # Switch / Megatron aux_loss on the whole batch
        grads = [g.numpy() for g in torch.autograd.grad(expected, list(router.parameters()))]
        megatron_total = sum(r["megatron_value"] for r in results)
        assert megatron_total == pytest.approx(expected.item(), rel=1e-6)  # float32 counts, exact
        for res in results:
            assert res["actreg_value"] == pytest.approx(expected.item(), rel=1e-10)
            for ours, theirs, exact in zip(res["actreg_grad"], res["megatron_grad"], grads, strict=True):
                np.testing.assert_allclose(ours, exact, rtol=1e-9, atol=1e-13)
                np.testing.assert_allclose(theirs * world, exact, rtol=1e-9, atol=1e-13)  # DP x


@pytest.mark.parametrize("world", [2, 3])
def test_expert_bias_is_torchtitans_centred_and_deepseeks_sign_update(pools, world):
    """``ExpertBias(update="centred")`` moves the bias as torchtitan's ``_update_expert_bias`` and
    ``update="sign"`` as DeepSeek-V3 / Megatron's ``get_updated_expert_bias``, from the same global
    counts (2 micro-batches per step, uneven and empty shards), routing with its own bias each step."""
    from dist_cases_coming_from import bias_updates

    results = pools[world].run(bias_updates, 6, 2, 1e-3, 4, 2, timeout=120)
    for update in ("centred", "sign"):
        for res in results:
            got = res[update]
            assert all(got["same_choice"])
            np.testing.assert_allclose(got["actreg"], got["reference"], rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose(got["actreg"], results[0][update]["actreg"], rtol=0, atol=0)
        assert np.abs(np.asarray(results[0][update]["actreg"][-1])).max() > 0  # the biases moved
    centred = np.asarray(results[0]["centred"]["actreg"])
    np.testing.assert_allclose(centred.sum(-1), 0.0, atol=1e-9)  # torchtitan's keeps a zero mean


# --- DeCov and sparse autoencoders -------------------------------------------------------------


def test_decov_is_half_the_off_diagonal_energy_of_the_biased_covariance():
    N, d, lam = 20, 5, 0.3
    h = _leaf(N, d, seed=11, scale=torch.linspace(0.5, 1.5, d, dtype=F64), shift=4.0)
    mu = torch.sum(h, 0) / N

    def cov(i: int, j: int) -> Tensor:  # C_ij = (1/N) sum_n (h_i^n - mu_i)(h_j^n - mu_j)
        return torch.sum((h[:, i] - mu[i]) * (h[:, j] - mu[j])) / N

    C = torch.stack([torch.stack([cov(i, j) for j in range(d)]) for i in range(d)])
    decov = 0.5 * (torch.sum(C**2) - torch.sum(torch.diagonal(C) ** 2))
    reg = _observed({"h": actreg.DeCov(lam)})
    reg.observe("h", h)
    _assert_same(reg.loss(), lam * decov, [h])


def test_sparse_autoencoder_kl_term():
    m, d, rho, beta = 30, 6, 0.1, 3.0
    x = _leaf(m, d, seed=12, shift=-1.0)
    a = 1 / (1 + torch.exp(-x))  # sigmoid hidden units
    rho_hat = torch.sum(a, 0) / m
    kl = rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))
    reg = _observed({"a": actreg.KLSparsity(target=rho, weight=beta)})
    reg.observe("a", a)
    _assert_same(reg.loss(), beta * torch.sum(kl), [x])


# --- the page's own code ----------------------------------------------------------------------


def _doc_blocks() -> list[tuple[str, str]]:
    text = DOC.read_text()
    out, section = [], "top"
    for part in re.split(r"^(## .*)$", text, flags=re.M):
        if part.startswith("## "):
            section = re.sub(r"\W+", "-", part[3:].strip().lower()).strip("-")
            continue
        out.extend((section, code) for code in re.findall(r"```python\n(.*?)```", part, re.S))
    return out


def test_every_recipe_has_a_code_block():
    sections = {s for s, _ in _doc_blocks()}
    headings = re.findall(r"^## (.*)$", DOC.read_text(), flags=re.M)
    assert len(sections) == len(headings) == 8, (sections, headings)


@pytest.mark.parametrize("section,code", _doc_blocks(), ids=[s for s, _ in _doc_blocks()])
def test_doc_code_block_runs(section: str, code: str):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a recipe that warns (e.g. TAR without time_dim) is wrong
        exec(compile(code, f"{DOC.name}:{section}", "exec"), {"__name__": f"coming_from_{section}"})
