"""Defects the differential soak (tests/soak.py) found, each reduced to a small exact test."""

from __future__ import annotations

import pytest
import torch

import actreg
import dist_cases_found


@pytest.mark.parametrize("world", [1, 2, 3])
def test_float64_activation_first_recorded_after_the_first_step_keeps_float64(pools, world):
    """A regularizer whose first ``loss()`` saw no activation on any rank used to agree on float32
    statistics for good, so float64 activations recorded later were summed in float32 (~1e-8 off).
    The dtype is now agreed when the first activation is recorded on some rank."""
    results = pools[world].run(dist_cases_found.late_float64, "global", timeout=90)
    for rank, got in enumerate(results):
        assert got[0] == 0.0
        for step in (1, 2):
            expected = dist_cases_found.late_float64_reference(step)
            assert got[step] == pytest.approx(expected, rel=1e-13, abs=0), (rank, step)
        assert got == results[0], f"rank {rank} differs from rank 0"


def _ema_model() -> tuple[torch.nn.Module, actreg.ActivityRegularizer]:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh()).double()
    reg = actreg.ActivityRegularizer(model, {"1": actreg.VarianceFloor(1.0)}, sync="ema", decay=0.5)
    return model, reg


def test_loaded_moving_average_survives_a_step_that_records_nothing():
    """``ema``: a regularizer restored with ``load_state_dict`` whose first step records nothing
    used to drop the loaded average of that slot (``state_dict()["ema"] == {}``, penalty 0, later
    steps off). It now continues exactly as the run that did not stop, in float64."""
    torch.manual_seed(0)
    xs = [torch.randn(6, 3, dtype=torch.float64) for _ in range(3)]
    model, reg = _ema_model()
    model(xs[0])
    reg.loss()
    state = reg.state_dict()
    restored_model, restored = _ema_model()
    restored.load_state_dict(state)
    for step, x in enumerate([None, *xs[1:]]):  # the first step after the load records nothing
        if x is not None:
            model(x)
            restored_model(x)
        expected, got = float(reg.loss().detach()), float(restored.loss().detach())
        assert expected > 0
        assert got == pytest.approx(expected, rel=1e-13, abs=0), step
        assert restored.state_dict()["ema"].keys() == reg.state_dict()["ema"].keys() == {"1"}


def test_local_mode_resumes_from_states_that_differ_per_rank(pools):
    """``local``: each rank saves the sizes it has seen, so states differ per rank; loading them used
    to raise ``LayoutMismatchError`` ("loaded_dims differ") on every rank. Each rank now continues
    exactly as its uninterrupted run."""
    for rank, got in enumerate(pools[2].run(dist_cases_found.local_resume, timeout=90)):
        assert got["resumed"] == pytest.approx(got["whole"], rel=1e-13, abs=0), rank
        assert got["whole"][2] > 0, rank
