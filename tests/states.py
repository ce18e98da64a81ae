"""Comparing ``ActivityRegularizer.state_dict()`` outputs in tests: nested dicts of tensors."""

from __future__ import annotations

from typing import Any

import torch


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Same keys at every level, bit-identical tensors, equal other values."""
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            assert_same_state(a[k], b[k])
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k
