"""Fast unit tests of the ``actreg`` command's pieces: config, penalty specs, sharding, verify math."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

import actreg
from actreg.demo.config import (
    TrainConfig,
    add_train_arguments,
    config_from_args,
    load_toml,
    parse_penalty,
    parse_penalty_option,
    penalties_from_options,
)
from actreg.demo.data import epoch_order, global_batches, load_digits_split, shard_bounds
from actreg.demo.verify import VerifyResult, compare_gradients, load_factory, make_problem


def _parse(argv: list[str]) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return config_from_args(parser.parse_args(argv))


# ---------------------------------------------------------------------- penalty specs
def test_parse_penalty_positional_and_keywords() -> None:
    p = parse_penalty("L1:1e-3")
    assert isinstance(p, actreg.L1) and p.weight == pytest.approx(1e-3)
    p = parse_penalty("variancefloor:0.1:gamma=0.5")
    assert isinstance(p, actreg.VarianceFloor) and (p.weight, p.gamma, p.eps) == (0.1, 0.5, 1e-4)
    p = parse_penalty("KLSparsity:0.05:1e-2")
    assert isinstance(p, actreg.KLSparsity) and (p.target, p.weight) == (0.05, 0.01)
    p = parse_penalty("LoadBalance:8:2:0.01")
    assert isinstance(p, actreg.LoadBalance) and (p.num_experts, p.top_k, p.weight) == (8, 2, 0.01)
    p = parse_penalty("TAR:0.5:time_dim=0")
    assert isinstance(p, actreg.TAR) and p.time_dim == 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("Nope:1", "unknown penalty"),
        ("L1:abc", "not a number"),
        ("L1:1:2", "too many"),
        ("L1", "missing"),
        ("VarianceFloor:weight=1:0.5", "positional argument after"),
        ("KLSparsity:2:1", "target must be a finite number in \\(0, 1\\)"),
        ("L1:1:wait=1", "unexpected keyword"),
    ],
)
def test_parse_penalty_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_penalty(spec)


def test_penalty_options_group_by_pattern() -> None:
    assert parse_penalty_option(" act1 = L1:1e-3 ") == ("act1", "L1:1e-3")
    with pytest.raises(ValueError, match="PATTERN=NAME"):
        parse_penalty_option("L1:1e-3")
    got = penalties_from_options(["act1=L1:1e-3", "act2=DeCov:1e-2", "act1=L2:1e-4"])
    assert got == {"act1": ["L1:1e-3", "L2:1e-4"], "act2": ["DeCov:1e-2"]}


# ---------------------------------------------------------------------- config
def test_toml_then_cli_precedence(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(
        'nproc = 3\nsync = "ema"\nepochs = 4\nbatch-size = 32\nlr = 1\nhidden = [32, 16, 8]\n'
        '[penalties]\n"act*" = "L1:1e-3"\nact3 = ["DeCov:1e-2", "VarianceFloor:0.1"]\n'
    )
    cfg = _parse(["--config", str(path), "--epochs", "7"])
    assert (cfg.nproc, cfg.sync, cfg.epochs, cfg.batch_size, cfg.lr, cfg.hidden) == (
        3,
        "ema",
        7,
        32,
        1.0,
        [32, 16, 8],
    )
    assert cfg.penalties == {"act*": ["L1:1e-3"], "act3": ["DeCov:1e-2", "VarianceFloor:0.1"]}
    cfg = _parse(["--config", str(path), "--penalty", "act1=L2:1"])
    assert cfg.penalties == {"act1": ["L2:1"]}  # --penalty replaces the file's table


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epochz = 3\n", "unknown setting"),
        ('epochs = "3"\n', "must be an integer"),
        ("[penalties]\nact1 = 3\n", "string or a list"),
        ('[penalties]\nact1 = "Foo:1"\n', "unknown penalty"),
        ("epochs = \n", "invalid TOML"),
    ],
)
def test_toml_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_toml(path)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="epochs"):
        _parse(["--epochs", "0"])
    with pytest.raises(ValueError, match="decay"):
        _parse(["--decay", "1.0"])


def test_to_argv_round_trip() -> None:
    cfg = TrainConfig(
        nproc=3, sync="local", penalties={"act1": ["L1:0.001"], "act*": ["DeCov:0.5", "L2:1"]}, epochs=3,
        batch_size=17, seed=5, lr=0.01, decay=0.5, hidden=[8, 4], out="x/y", resume=True, plots=False,
    )  # fmt: skip
    assert _parse(cfg.to_argv(include_nproc=True)) == cfg
    assert _parse([]) == TrainConfig()


# ---------------------------------------------------------------------- data
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shards_are_contiguous_uneven_and_without_duplicates(world: int) -> None:
    for n in range(0, 23):
        bounds = [shard_bounds(n, world, r) for r in range(world)]
        sizes = [hi - lo for lo, hi in bounds]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(bounds[r][1] == bounds[r + 1][0] for r in range(world - 1))  # contiguous, disjoint
        assert sum(sizes) == n and max(sizes) - min(sizes) <= 1  # no padding, no duplicates
    with pytest.raises(ValueError):
        shard_bounds(4, 2, 2)


def test_global_batches_partition_each_epoch_deterministically() -> None:
    batches = global_batches(101, 16, seed=3, epoch=0)
    assert [b.numel() for b in batches] == [16] * 6 + [5]
    assert sorted(torch.cat(batches).tolist()) == list(range(101))
    assert torch.equal(torch.cat(batches), epoch_order(101, 3, 0))
    assert torch.equal(epoch_order(101, 3, 1), epoch_order(101, 3, 1))
    assert not torch.equal(epoch_order(101, 3, 0), epoch_order(101, 3, 1))
    # Whatever the world size, the shards of a global batch concatenate to the batch.
    for world in (1, 2, 3):
        shards = [batches[-1][slice(*shard_bounds(5, world, r))] for r in range(world)]
        assert torch.equal(torch.cat(shards), batches[-1])


@pytest.mark.parametrize("seed", [-(2**63), -1, 0, 184_467_440_737_096, 2**63 - 1, 2**64 - 1])
def test_every_seed_in_torchs_range_is_accepted_and_orders_every_epoch(seed: int) -> None:
    """``--seed`` takes torch's whole seed range; the per-epoch seed derived from it used to overflow
    torch's in the workers for seeds above ~1.8e14 (``seed * 100003`` beyond 2**64)."""
    assert _parse(["--seed", str(seed)]).seed == seed
    for epoch in (0, 11):
        assert sorted(epoch_order(37, seed, epoch).tolist()) == list(range(37))
    assert not torch.equal(epoch_order(37, seed, 0), epoch_order(37, seed, 1))


@pytest.mark.parametrize("seed", [-5, 0, 3, 10**13])
def test_seeds_that_worked_keep_their_batch_order(seed: int) -> None:
    """The reduction modulo 2**64 changes no order torch gave before (it reduces the same way)."""
    for epoch in (0, 7):
        old = torch.Generator().manual_seed(seed * 100_003 + epoch + 1)
        assert torch.equal(epoch_order(37, seed, epoch), torch.randperm(37, generator=old))


def test_digits_split() -> None:
    pytest.importorskip("sklearn")
    d = load_digits_split(seed=0, test_fraction=0.2)
    assert d.x_train.shape == (1437, 64) and d.x_test.shape == (360, 64)
    assert d.y_train.dtype == torch.int64 and set(d.y_test.tolist()) == set(range(10))
    assert d.x_train.mean().abs() < 0.05
    again = load_digits_split(seed=0, test_fraction=0.2)
    assert torch.equal(d.x_test, again.x_test)


# ---------------------------------------------------------------------- verify pieces
def test_load_factory(tmp_path: Path) -> None:
    assert callable(load_factory("actreg.demo.model:verify_factory"))
    path = tmp_path / "fac.py"
    path.write_text("def make():\n    return 1\n")
    assert load_factory(f"{path}:make")() == 1
    for bad, message in [("nocolon", "MODULE:FACTORY"), ("no_such_mod_xyz:f", "cannot import"),
                         ("actreg.demo.model:nothing", "no callable")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            load_factory(bad)


def test_demo_factory_problem_is_float64_and_uneven() -> None:
    problem = make_problem("actreg.demo.model:verify_factory", torch.float64)
    assert problem.inputs.dtype == torch.float64 and problem.inputs.shape[0] % 2 == 1
    assert all(p.dtype == torch.float64 for p in problem.model.parameters())
    assert problem.targets is not None and problem.targets.dtype == torch.int64


def test_verify_result_pass_fail() -> None:
    ref = {"a": torch.tensor([1.0, -2.0], dtype=torch.float64), "b": torch.zeros(3)}
    rows = compare_gradients(
        ref, {"a": torch.tensor([1.0, -2.0 + 1e-9], dtype=torch.float64), "b": torch.zeros(3)}
    )
    res = VerifyResult("t", 2, "global", "float64", 1e-6, [3, 2], True, 0.0, 0.0, rows)
    assert res.max_abs == pytest.approx(1e-9) and res.max_rel == pytest.approx(5e-10) and res.passed
    assert "PASS" in res.format()
    rows = compare_gradients(ref, {"a": torch.tensor([1.1, -2.0]), "b": torch.zeros(3)})
    res = VerifyResult("t", 2, "local", "float64", 1e-6, [3, 2], True, 0.0, 0.0, rows)
    assert not res.passed and "FAIL" in res.format()
