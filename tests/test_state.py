"""EMA state: identical on every rank, bit-for-bit resumption, loads at another world size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dist_cases
import reference
from problem import CASES
from states import assert_same_state

NAMES = ["KLSparsity", "VarianceFloor", "Covariance", "LoadBalance"]


@pytest.fixture(scope="module")
def straight(pools):
    return pools[2].run(dist_cases.train, NAMES, "ema", 4)


def test_state_is_identical_on_every_rank(straight):
    for name in NAMES:
        reg_states = [r[name]["state"]["reg"] for r in straight]
        assert reg_states[0]["step"] == 4 and reg_states[0]["ema"]
        assert_same_state(reg_states[0], reg_states[1])


def test_round_trip_continues_bit_for_bit(pools, straight):
    half = pools[2].run(dist_cases.train, NAMES, "ema", 2)
    states = {n: half[0][n]["state"] for n in NAMES}
    resumed = pools[2].run(dist_cases.train, NAMES, "ema", 2, 2, states)
    for rank in range(2):
        for name in NAMES:
            assert resumed[rank][name]["loss"] == straight[rank][name]["loss"][2:], name
            for a, b in zip(resumed[rank][name]["params"], straight[rank][name]["params"], strict=True):
                assert np.array_equal(a, b), name
            assert_same_state(resumed[rank][name]["state"]["reg"], straight[rank][name]["state"]["reg"])


def test_state_saved_at_two_ranks_loads_at_three(pools):
    half = pools[2].run(dist_cases.train, NAMES, "ema", 2)
    states = {n: half[1][n]["state"] for n in NAMES}
    resumed = pools[3].run(dist_cases.train, NAMES, "ema", 2, 2, states)
    for name in NAMES:
        ref = reference.run(name, CASES[name][1], "ema", 3, 4)
        for rank in range(3):
            got = resumed[rank][name]
            assert got["loss"] == pytest.approx(ref["loss"][2:], rel=1e-7), name
            for a, b in zip(got["params"], ref["params"], strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-12)


def test_state_dict_loads_with_torch_load_weights_only(tmp_path, straight):
    state = straight[0]["VarianceFloor"]["state"]["reg"]
    torch.save(state, tmp_path / "reg.pt")
    loaded = torch.load(tmp_path / "reg.pt", weights_only=True)
    assert_same_state(state, loaded)
