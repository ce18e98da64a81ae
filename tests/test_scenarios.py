"""``--scenario NAME``: presets of the demo's defaults (parsing, precedence, validation), the
feature-spread metric of ``actreg compare`` against hand-computed and numpy float64 values, and a
tiny ``actreg compare --scenario vicreg`` run on 4 gloo ranks that shows what the scenario is for.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from actreg.cli import main
from actreg.demo.config import TrainConfig, add_train_arguments, config_from_args
from actreg.demo.preflight import check_penalties_fit
from actreg.demo.report import feature_spread, held_out_penalty
from actreg.demo.scenarios import SCENARIOS, get_scenario

DEFAULT_PENALTIES = {"act1": ["L1:2e-3"], "act2": ["L1:1e-3", "DeCov:2e-2"]}
VICREG_PENALTIES = {"act1": ["VarianceFloor:1", "Covariance:0.01"]}


def _parse(argv: list[str]) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return config_from_args(parser.parse_args(argv))


# ---------------------------------------------------------------------- parsing and precedence
@pytest.mark.parametrize("argv", [[], ["--scenario", "default"]])
def test_default_scenario_is_the_builtin_defaults(argv: list[str]) -> None:
    cfg = _parse(argv)
    assert cfg.scenario == "default"
    assert (cfg.nproc, cfg.batch_size, cfg.epochs, cfg.hidden) == (2, 64, 12, [128, 64])
    assert cfg.penalties == DEFAULT_PENALTIES
    assert "--scenario" not in cfg.to_argv()  # the workers' command line is unchanged too


def test_scenario_sets_the_defaults() -> None:
    cfg = _parse(["--scenario", "vicreg"])
    assert (cfg.scenario, cfg.nproc, cfg.batch_size, cfg.epochs) == ("vicreg", 4, 8, 2)
    assert cfg.penalties == VICREG_PENALTIES
    assert (cfg.hidden, cfg.lr, cfg.sync) == ([128, 64], 3e-3, "global")  # not set by the scenario


def test_options_given_explicitly_win_over_the_scenario() -> None:
    cfg = _parse(["--scenario", "vicreg", "--batch-size", "16", "--penalty", "act2=L1:1e-3", "--nproc", "2"])
    assert (cfg.nproc, cfg.batch_size, cfg.epochs) == (2, 16, 2)
    assert cfg.penalties == {"act2": ["L1:1e-3"]}  # --penalty replaces the scenario's table


def test_toml_sits_between_the_scenario_and_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('scenario = "vicreg"\nbatch_size = 16\n')
    cfg = _parse(["--config", str(path)])
    assert (cfg.scenario, cfg.nproc, cfg.batch_size) == ("vicreg", 4, 16)  # file over scenario
    cfg = _parse(["--config", str(path), "--batch-size", "32"])
    assert cfg.batch_size == 32  # command line over file
    cfg = _parse(["--config", str(path), "--scenario", "default"])
    assert (cfg.scenario, cfg.nproc, cfg.batch_size) == ("default", 2, 16)  # the command line names it
    assert cfg.penalties == DEFAULT_PENALTIES


def test_the_workers_rebuild_the_same_config() -> None:
    cfg = _parse(["--scenario", "vicreg", "--batch-size", "12", "--out", "x"])
    argv = cfg.to_argv(include_nproc=True)
    assert argv[argv.index("--scenario") + 1] == "vicreg"
    assert _parse(argv) == cfg


def test_unknown_scenario_on_the_command_line_exits_2_with_the_choices(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--scenario", "nope"])
    assert exc.value.code == 2
    assert "invalid choice: 'nope' (choose from 'default', 'vicreg')" in capsys.readouterr().err


def test_unknown_scenario_in_the_config_file_exits_2_with_the_choices(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "run.toml"
    path.write_text('scenario = "nope"\n')
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "actreg train: error: unknown scenario 'nope'; choose from: default, vicreg"
    assert not (tmp_path / "out").exists()  # refused before anything was written or launched
    with pytest.raises(ValueError, match="choose from: default, vicreg"):
        TrainConfig(scenario="nope").validate()


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_scenario_is_valid_and_fits_the_demo_model(name: str) -> None:
    settings = get_scenario(name).defaults()
    assert set(settings) <= set(TrainConfig.__dataclass_fields__)
    cfg = TrainConfig(scenario=name, **settings).validate()
    check_penalties_fit(cfg)
    settings.setdefault("penalties", {}).clear()  # a copy: the scenario itself is unchanged
    assert get_scenario(name).defaults() == get_scenario(name).settings


# ---------------------------------------------------------------------- the metric
def test_feature_spread_hand_computed() -> None:
    a, b = math.sqrt(3.0), math.sqrt(3.0) / 2
    # Uncorrelated columns with unbiased variances 4 a^2 / 3 = 4 and 4 b^2 / 3 = 1.
    x = torch.tensor([[a, b], [a, -b], [-a, b], [-a, -b]]) + 5.0
    spread = feature_spread(x)
    assert spread["std"] == pytest.approx((2.0 + 1.0) / 2, rel=1e-6)
    p = (0.8, 0.2)  # eigenvalues 4 and 1 over their sum
    assert spread["effective_rank"] == pytest.approx(math.exp(-sum(q * math.log(q) for q in p)), rel=1e-6)
    # One direction: rank 1; isotropic: the width; nothing varies: 0.
    line = torch.arange(6.0).reshape(6, 1) * torch.tensor([[1.0, -2.0, 0.5]])
    assert feature_spread(line)["effective_rank"] == pytest.approx(1.0, rel=1e-6)
    iso = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert feature_spread(iso) == pytest.approx({"std": math.sqrt(4 / 3), "effective_rank": 2.0})
    assert feature_spread(torch.ones(5, 3)) == {"std": 0.0, "effective_rank": 0.0}
    assert feature_spread(torch.ones(1, 3)) == {"std": 0.0, "effective_rank": 0.0}


def test_feature_spread_against_numpy() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 6)) @ rng.standard_normal((6, 6))
    cov = np.cov(x, rowvar=False)
    eig = np.clip(np.linalg.eigvalsh(cov), 0, None)
    p = eig / eig.sum()
    spread = feature_spread(torch.tensor(x, dtype=torch.float32).reshape(5, 10, 6))  # positions first
    assert spread["std"] == pytest.approx(float(np.sqrt(np.diag(cov)).mean()), rel=1e-5)
    assert spread["effective_rank"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-5)


def test_held_out_penalty_against_float64_formulas() -> None:
    rng = np.random.default_rng(1)
    a1, a2 = rng.standard_normal((40, 5)) * 0.7, rng.standard_normal((40, 3))
    n, d = a1.shape
    var = a1.var(0, ddof=1)
    floor = np.maximum(0.0, 1.0 - np.sqrt(var + 1e-4)).mean()  # VarianceFloor:1 (gamma 1, eps 1e-4)
    c = np.cov(a1, rowvar=False)
    off = ((c**2).sum() - (np.diag(c) ** 2).sum()) / d  # Covariance:0.04, without its weight
    l1 = np.abs(a2).sum() / a2.shape[0]  # L1 on act2
    acts = {"act1": torch.tensor(a1, dtype=torch.float32), "act2": torch.tensor(a2, dtype=torch.float32)}
    penalties = {"act1": ["VarianceFloor:1", "Covariance:0.04"], "act*": ["L1:1e-2"]}
    expected = floor + 0.04 * off + 1e-2 * (np.abs(a1).sum() / n + l1)  # "act*" matches both layers
    assert held_out_penalty(penalties, acts) == pytest.approx(expected, rel=1e-5)
    assert held_out_penalty({"head": ["L1:1"]}, acts) == 0.0  # no layer matches


# ---------------------------------------------------------------------- the scenario's point, tiny
def test_vicreg_scenario_compare_shows_the_per_rank_penalty_shrinking_features(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("rich")
    argv = ["compare", "--scenario", "vicreg", "--epochs", "1", "--test-fraction", "0.8", "--lr", "0.01"]
    argv += ["--modes", "local,global", "--no-plots", "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 0
    table = capfd.readouterr().out
    assert "act1 std" in table and "act1 rank" in table
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["title"].endswith("scenario vicreg") and "4 ranks, batch 8" in data["title"]
    local, global_ = ({r["mode"]: r for r in data["rows"]}[m] for m in ("local", "global"))
    assert global_["objective_error"] == 0.0 and local["objective_error"] > 0.1
    # Per-rank 2-sample covariances shrink every unit's spread: a worse global-batch penalty.
    assert local["feature_std"]["act1"] < 0.8 * global_["feature_std"]["act1"]
    assert local["penalty_test"] > 1.2 * global_["penalty_test"]
    text = (tmp_path / "compare.md").read_text()
    assert "| penalty (test set) |" in text and "| act1 std | act1 eff. rank |" in text
    (command,) = [line for line in text.splitlines() if line.startswith("torchrun ")]
    assert "-m actreg.demo.compare --scenario vicreg" in command and command.endswith("--modes local,global")
    assert f"--out {tmp_path} " in command and "--sync" not in command  # not one mode's run
