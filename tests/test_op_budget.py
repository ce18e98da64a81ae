"""Op budget: top-level aten ops that actreg adds per regularized layer per step (benchmarks/op_count.py).

The counts are deterministic (dispatched ops, not timings) and do not depend on the width, so the
MLPs here are 64 wide. On failure the message shows the per-phase split and the op names that
cost most per layer. The same figures from the command line:

    python benchmarks/op_count.py --by-name
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import op_count

WIDTH = 64


def _report(f: op_count.Fit) -> str:
    return f"\n{op_count.table([f])}\n\nadded ops by L: {f.added}\n\n{f.by_name_table()}"


@pytest.mark.parametrize("config", list(op_count.CONFIGS))
def test_ops_per_layer_and_fixed_within_budget(config: str) -> None:
    f = op_count.fit_details(config, width=WIDTH)
    per_layer, fixed = f.per_layer["total"], f.fixed["total"]
    budget = op_count.BUDGETS[config]
    assert per_layer <= budget, (
        f"{config}: {per_layer:g} top-level aten ops added per regularized layer (budget {budget})"
        + _report(f)
    )
    assert f.infrastructure <= op_count.FIXED_BUDGET, (
        f"{config}: {f.infrastructure:g} fixed ops per step for pack, collective and decisions "
        f"(budget {op_count.FIXED_BUDGET}; fixed part {fixed:g} of which {f.value_ops} penalty values)"
        + _report(f)
    )
    # the penalty values are evaluated per kind of penalty: their cost does not grow with layers
    assert len(set(f.values.values())) == 1, f.values
    assert f.value_ops <= op_count.VALUE_BUDGETS[config], (f.value_ops, _report(f))
    assert f.max_residual < 1e-9, f"{config}: the added ops are not linear in the layers" + _report(f)


def test_counting_method() -> None:
    """The fast event tree agrees with ``prof.events()``'s, and the width changes no count."""
    counts, prof = op_count.profile_step("L1+DeCov", layers=2, width=WIDTH)
    total: Counter[str] = Counter()
    for phase in op_count.PHASES:
        total += counts[phase]
    profiled = Counter({name: n * op_count.PROFILED_STEPS for name, n in total.items()})
    assert op_count.top_level_names_via_events(prof) == profiled
    for config in (None, "L1+DeCov"):
        assert op_count.profile_step(config, 2, width=512)[0] == op_count.profile_step(config, 2, WIDTH)[0]
