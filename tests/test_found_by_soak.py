"""Defects the differential soak (tests/soak.py) found, each reduced to a small exact test."""

from __future__ import annotations

import pytest

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
