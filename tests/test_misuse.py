"""Misuse that used to give silent wrong results: eval-mode forwards, lax ``load_state_dict``.

Single process; the values are checked against formulas written here, not through actreg.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import actreg
from states import assert_same_state


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _l1(model: nn.Sequential, x: torch.Tensor, weight: float) -> float:
    with torch.no_grad():
        h = model[1](model[0](x))
    return weight * float(h.abs().sum() / h.shape[0])


# ------------------------------------------------------------------ eval-mode forwards
def test_eval_mode_forward_with_autograd_is_not_recorded():
    model = _model()
    reg = actreg.ActivityRegularizer(model, {"1": actreg.L1(0.5)})
    train_x = torch.randn(8, 4, dtype=torch.float64)
    eval_x = torch.randn(32, 4, dtype=torch.float64) * 10
    model.eval()
    model(eval_x)  # an evaluation pass under autograd (no torch.no_grad)
    model.train()
    model(train_x)
    assert reg.loss().item() == pytest.approx(_l1(model, train_x, 0.5), rel=1e-12)
    # an evaluation pass between forward and loss() adds nothing either
    model(train_x)
    model.eval()
    model(eval_x)
    model.train()
    assert reg.loss().item() == pytest.approx(_l1(model, train_x, 0.5), rel=1e-12)


def test_record_eval_opts_in():
    model = _model()
    reg = actreg.ActivityRegularizer(model, {"1": actreg.L1(0.5)}, record_eval=True)
    x = torch.randn(8, 4, dtype=torch.float64)
    model.eval()
    model(x)
    assert reg.loss().item() == pytest.approx(_l1(model, x, 0.5), rel=1e-12)


def test_observe_follows_the_models_mode():
    model = _model()
    reg = actreg.ActivityRegularizer(model, {"z": actreg.L2(1.0)}, observed=["z"])
    z = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    model.eval()
    reg.observe("z", z * 100)
    model.train()
    reg.observe("z", z)
    assert reg.loss().item() == pytest.approx(float((z.detach() ** 2).sum() / 5), rel=1e-12)


# ------------------------------------------------------------------ load_state_dict
def _trained(sync: str = "ema", decay: float = 0.9, steps: int = 2, **kw) -> actreg.ActivityRegularizer:
    model = _model()
    reg = actreg.ActivityRegularizer(
        model, {"1": [actreg.VarianceFloor(1.0), actreg.L1(0.1)]}, sync=sync, decay=decay, **kw
    )
    for step in range(steps):
        model(torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(step)))
        reg.loss()
    return reg


def _snapshot(reg: actreg.ActivityRegularizer) -> dict:
    return copy.deepcopy(reg.state_dict())


def _broken(state: dict, change) -> dict:
    state = copy.deepcopy(state)
    change(state)
    return state


BROKEN = {
    "missing step": (lambda s: s.pop("step"), ValueError, r"missing key\(s\) \['step'\]"),
    "missing ema": (lambda s: s.pop("ema"), ValueError, r"missing key\(s\) \['ema'\]"),
    "unexpected key": (lambda s: s.update(extra=1), ValueError, r"unexpected key\(s\) \['extra'\]"),
    "version": (lambda s: s.update(version=2), ValueError, r"\['version'\] is 2"),
    "sync": (lambda s: s.update(sync="global"), ValueError, r"\['sync'\] is 'global'.*sync='ema'"),
    "decay": (lambda s: s.update(decay=0.5), ValueError, r"\['decay'\] is 0.5.*decay=0.9"),
    "negative step": (lambda s: s.update(step=-1), ValueError, r"\['step'\] must be an integer >= 0, got -1"),
    "missing statistic": (
        lambda s: s["ema"]["1"]["VarianceFloor"].pop("sq_sum"),
        ValueError,
        r"\['ema'\]\['1'\]\['VarianceFloor'\] has statistics",
    ),
    "missing penalty": (
        lambda s: s["ema"]["1"].pop("L1"),
        ValueError,
        r"\['ema'\]\['1'\] is missing the statistics of \['L1'\]",
    ),
    "missing slot": (lambda s: s["ema"].pop("1"), ValueError, r"no statistics for '1', which ran \(6 "),
    "unknown slot": (lambda s: s["ema"].update(foo={}), ValueError, r"has 'foo', which this regularizer"),
    "wrong shape": (
        lambda s: s["ema"]["1"]["VarianceFloor"].update(sum=torch.zeros(7, dtype=torch.float64)),
        ValueError,
        r"\['VarianceFloor'\]\['sum'\] has shape \[7\], expected \[6\]",
    ),
    "non-finite": (
        lambda s: s["ema"]["1"]["L1"]["abs_sum"].fill_(float("nan")),
        ValueError,
        r"non-finite values",
    ),
    "not a tensor": (
        lambda s: s["ema"]["1"]["L1"].update(abs_sum=0.0),
        TypeError,
        r"\['abs_sum'\] must be a tensor, got float",
    ),
    "shift shape": (
        lambda s: s["shift"].update({"1": torch.zeros(5, dtype=torch.float64)}),
        ValueError,
        r"\['shift'\]\['1'\] is for 5 features, but .*'1'.* 6",
    ),
    "dims": (lambda s: s["dims"].update({"1": 7}), ValueError, r"for 7 features"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_load_state_dict_validates_everything_before_applying_anything(case):
    source = _trained()
    change, error, words = BROKEN[case]
    bad = _broken(source.state_dict(), change)
    for target in (_trained(steps=3), _trained(steps=0)):  # after steps (sizes known) and fresh
        before = _snapshot(target)
        with pytest.raises(error, match=words):
            target.load_state_dict(bad)
        assert_same_state(before, _snapshot(target))  # all or nothing: nothing applied


def test_a_good_state_still_loads_and_continues_exactly():
    a, b = _trained(steps=2), _trained(steps=0)
    b.load_state_dict(a.state_dict())
    assert_same_state(a.state_dict(), b.state_dict())


def test_feature_size_mismatch_is_named_at_load_or_at_the_first_step():
    source = _trained()
    wide = nn.Sequential(nn.Linear(4, 9), nn.Tanh(), nn.Linear(9, 3)).double()
    reg = actreg.ActivityRegularizer(
        wide, {"1": [actreg.VarianceFloor(1.0), actreg.L1(0.1)]}, sync="ema", decay=0.9
    )
    reg.load_state_dict(source.state_dict())  # sizes not known yet: checked at the first record
    wide(torch.randn(8, 4, dtype=torch.float64))
    assert reg.loss().item() == 0.0  # that step failed on every rank: no penalty, no gradient
    with pytest.raises(actreg.RecordingError, match=r"'1'.*9 features, but the state .* saved with 6"):
        reg.check()
    # once sizes are known, at once
    reg2 = actreg.ActivityRegularizer(
        wide, {"1": [actreg.VarianceFloor(1.0), actreg.L1(0.1)]}, sync="ema", decay=0.9
    )
    wide(torch.randn(8, 4, dtype=torch.float64))
    reg2.loss()
    with pytest.raises(ValueError, match=r"is for 6 features, but '1' has 9 features"):
        reg2.load_state_dict(source.state_dict())


def test_states_written_before_dims_existed_still_load():
    a = _trained(steps=2)
    legacy = a.state_dict()
    legacy.pop("dims")
    b = _trained(steps=0)
    b.load_state_dict(legacy)
    assert_same_state(a.state_dict(), b.state_dict())


# ------------------------------------------------------------------ compiled, unmasked
def test_compiled_model_without_mask_trains_several_steps():
    """The cached count of an unmasked activation must not be stored from inside a traced graph
    (it came back attached to the first step: "backward through the graph a second time")."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh())
    reg = actreg.ActivityRegularizer(model, {"1": [actreg.L1(1.0), actreg.TAR(1.0, time_dim=1)]})
    run = torch.compile(model, backend="eager")
    for _ in range(3):
        x = torch.randn(4, 7, 5)
        h = run(x)
        loss = reg.loss()
        loss.backward()
        h = h.detach()
        expected = h.abs().sum() / 28 + (h[:, 1:] - h[:, :-1]).pow(2).mean()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
