"""``actreg train`` / ``compare`` / ``verify`` refuse bad input before any worker starts: exit code 2
and one line ``actreg <command>: error: ...``. Each case runs ``actreg.cli.main`` in-process with the
launcher replaced by one that fails the test if it is ever called. Also: the run directory lock and
the refusal of a reused ``--out`` on the worker side (plain ``torchrun``), in-process with one rank.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from actreg.cli import main
from actreg.demo import launch
from actreg.demo.checkpoints import checkpoint_path, list_checkpoints, save_checkpoint
from actreg.demo.config import TrainConfig
from actreg.demo.rundir import LOCK_ENV, lock_run_directory, unlock_run_directory

pytest.importorskip("sklearn")
pytest.importorskip("rich")

BASE = ["--nproc", "1", "--no-plots", "--no-progress"]
HOLD_LOCK = (
    "import sys, time\n"
    "from actreg.demo.rundir import lock_run_directory\n"
    "lock_run_directory(sys.argv[1])\n"
    "print('locked', flush=True)\n"
    "time.sleep(120)\n"
)


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str, list[str]]]:
    """The launches main() asked for (none are started)."""
    calls: list[tuple[int, str, list[str]]] = []

    def fake_launch(nproc: int, module: str, argv: list[str], **_: object) -> None:
        calls.append((nproc, module, list(argv)))

    monkeypatch.setattr(launch, "launch_module", fake_launch)
    return calls


def _checkpoint(out: Path, epoch: int, **settings: object) -> Path:
    """A valid checkpoint of ``epoch`` written by a run with ``settings`` (defaults otherwise)."""
    path = checkpoint_path(out, epoch)
    state = {
        "epoch": epoch,
        "model": {"w": torch.ones(2)},
        "optimizer": {},
        "regularizer": {},
        "config": TrainConfig(**settings).to_dict(),  # type: ignore[arg-type]
        "world_size": 2,
        "torch_rng": torch.get_rng_state(),
    }
    save_checkpoint(path, state)
    return path


def _run_dir_file(tmp: Path) -> list[str]:
    (tmp / "out").write_text("not a directory")
    return ["--out", str(tmp / "out")]


def _checkpoints_file(tmp: Path) -> list[str]:
    (tmp / "out").mkdir()
    (tmp / "out" / "checkpoints").write_text("not a directory")
    return ["--out", str(tmp / "out")]


def _below_a_file(tmp: Path) -> list[str]:
    (tmp / "file").write_text("")
    return ["--out", str(tmp / "file" / "run")]


def _reused(tmp: Path) -> list[str]:
    _checkpoint(tmp / "out", 12)
    return ["--out", str(tmp / "out")]


def _resume_below(tmp: Path) -> list[str]:
    _checkpoint(tmp / "out", 5)
    return ["--out", str(tmp / "out"), "--resume", "--epochs", "3"]


def _resume_all_damaged(tmp: Path) -> list[str]:
    _checkpoint(tmp / "out", 1).write_bytes(b"")
    _checkpoint(tmp / "out", 2).write_bytes(b"\0" * 100)
    return ["--out", str(tmp / "out"), "--resume"]


def _resume_other_penalty(tmp: Path) -> list[str]:
    _checkpoint(tmp / "out", 1, penalties={"act1": ["L1:2e-3"]})
    return ["--out", str(tmp / "out"), "--resume", "--penalty", "act1=L1:2.5e-3"]


def _plain(*argv: str) -> Callable[[Path], list[str]]:
    return lambda tmp: ["--out", str(tmp / "out"), *argv]


def _config_not_utf8(tmp: Path) -> list[str]:
    (tmp / "run.toml").write_bytes(b"seed = 1\n# caf\xe9 in Latin-1\n")
    return ["--out", str(tmp / "out"), "--config", str(tmp / "run.toml")]


def _config_hidden_not_integers(tmp: Path) -> list[str]:
    (tmp / "run.toml").write_text('hidden = "128,abc"\n')
    return ["--out", str(tmp / "out"), "--config", str(tmp / "run.toml")]


CASES = {
    "L1:nan": (_plain("--penalty", "act1=L1:nan"), "penalty spec 'L1:nan': 'nan' is not a finite number"),
    "L1:inf": (_plain("--penalty", "act1=L1:inf"), "'inf' is not a finite number"),
    "pattern matching no module": (_plain("--penalty", "nothing=L1:1e-3"), "'nothing' matches no module"),
    "LoadBalance:8 on 128 wide": (
        _plain("--penalty", "act1=LoadBalance:8:2:0.01"),
        "does not fit: 'act1': ValueError: LoadBalance(num_experts=8) got router logits with 128 features",
    ),
    "lr -1": (_plain("--lr", "-1"), "lr must be a finite number > 0, got -1.0"),
    "lr nan": (_plain("--lr", "nan"), "lr must be a finite number > 0, got nan"),
    "test fraction 0.9999": (_plain("--test-fraction", "0.9999"), "leaves 0 of the 1797 digits"),
    "keep 0": (_plain("--keep", "0"), "keep must be >= 1"),
    "seed 2**64": (
        _plain("--seed", str(2**64)),
        f"--seed {2**64} is outside torch's seed range [-2**63, 2**64 - 1] = [{-(2**63)}, {2**64 - 1}]",
    ),
    "seed -2**63-1": (_plain("--seed", str(-(2**63) - 1)), "is outside torch's seed range"),
    "hidden 128,abc": (
        _plain("--hidden", "128,abc"),
        "--hidden '128,abc': expected the hidden layer sizes as comma-separated positive integers",
    ),
    "hidden 128,abc in the config": (_config_hidden_not_integers, "run.toml: --hidden '128,abc': expected"),
    "config not UTF-8": (_config_not_utf8, "run.toml: not UTF-8 text (invalid continuation byte: byte 0xe9"),
    "resume and overwrite": (_plain("--resume", "--overwrite"), "--resume and --overwrite exclude"),
    "out is a file": (_run_dir_file, "is an existing file, not a directory"),
    "out/checkpoints is a file": (_checkpoints_file, "checkpoints is an existing file, not a directory"),
    "out below a file": (_below_a_file, "cannot create the output directory"),
    "out holds another run": (
        _reused,
        "holds another run's checkpoints (epoch_012.pt); continue that run with --resume, replace it with "
        "--overwrite",
    ),
    "resume with fewer epochs": (_resume_below, "is at epoch 5, beyond --epochs 3"),
    "resume with only damaged checkpoints": (_resume_all_damaged, "no usable checkpoint"),
    "resume with another penalty value": (_resume_other_penalty, "written with other settings: penalties:"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_train_refuses_before_any_worker_starts(
    case: str, tmp_path: Path, launches: list[object], capsys: pytest.CaptureFixture[str]
) -> None:
    make_argv, message = CASES[case]
    assert main(["train", *BASE, *make_argv(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("actreg train: error: ") and err.count("\n") == 1, err
    assert message in err
    assert launches == []


def test_resume_accepts_the_same_values_spelled_otherwise(
    tmp_path: Path, launches: list[tuple[int, str, list[str]]]
) -> None:
    _checkpoint(tmp_path, 1, penalties={"act1": ["L1:2e-3"], "act2": ["DeCov:2e-2"]})
    argv = ["--out", str(tmp_path), "--resume", "--penalty", "act1=l1:0.002", "--penalty", "act2=DeCov:0.02"]
    assert main(["train", *BASE, *argv]) == 0
    assert len(launches) == 1 and "--resume" in launches[0][2]


def test_overwrite_accepts_a_reused_directory(
    tmp_path: Path, launches: list[tuple[int, str, list[str]]]
) -> None:
    _checkpoint(tmp_path, 12)
    assert main(["train", *BASE, "--out", str(tmp_path), "--overwrite"]) == 0
    assert len(launches) == 1 and "--overwrite" in launches[0][2]


def test_compare_refuses_a_reused_mode_directory(
    tmp_path: Path, launches: list[object], capsys: pytest.CaptureFixture[str]
) -> None:
    _checkpoint(tmp_path / "global", 1)
    assert main(["compare", *BASE, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("actreg compare: error: ") and f"{tmp_path / 'global'}: holds another run's" in err
    assert launches == []


def test_compare_creates_no_checkpoints_directory_of_its_own(
    tmp_path: Path, launches: list[object], capsys: pytest.CaptureFixture[str]
) -> None:
    """Each mode writes ``--out/<mode>/checkpoints``; ``--out/checkpoints`` is no file of compare's:
    not created, and a file in its place (or a directory it could not create) does not matter."""
    assert main(["compare", *BASE, "--out", str(tmp_path / "fresh"), "--modes", "none,global"]) == 0
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == [".lock", "global", "none"]
    assert (tmp_path / "fresh" / "global" / "checkpoints").is_dir()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "checkpoints").write_text("not compare's")
    argv = ["compare", *BASE, "--out", str(tmp_path / "old"), "--modes", "local"]
    assert main(argv) == 0, capsys.readouterr().err
    assert len(launches) == 2


def test_compare_refuses_resume(
    tmp_path: Path, launches: list[object], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["compare", *BASE, "--out", str(tmp_path), "--resume"]) == 2
    assert "actreg compare trains every mode from scratch" in capsys.readouterr().err
    assert launches == []


@pytest.mark.parametrize("tol", ["-1", "0", "nan", "inf", "x"])
def test_verify_tol_must_be_finite_and_positive(tol: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["verify", "--tol", tol])
    assert info.value.code == 2
    assert "actreg verify: error: argument --tol:" in capsys.readouterr().err


INTEGER_ACTIVATION = """
import torch
from torch import nn
import actreg

class Quantize(nn.Module):
    def forward(self, x):
        return x.round().long()

class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.quant = Quantize()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc(x)
        self.quant(h)
        return self.head(h)

def with_targets():
    return Model(), (torch.randn(11, 6), torch.randint(0, 3, (11,))), {"quant": actreg.L1(1e-2)}

def without_targets():
    return Model(), torch.randn(11, 6), {"quant": actreg.L1(1e-2)}
"""


@pytest.mark.parametrize("factory", ["with_targets", "without_targets"])
def test_verify_names_a_regularized_module_with_integer_outputs(
    factory: str, tmp_path: Path, launches: list[object], capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 3 (your model is at fault) naming the module and its dtype, before any worker starts. It
    used to blame "the backward through the model" (no task loss) or PASS having compared the task
    loss's gradients alone (the penalty of a step that cannot record is zero)."""
    (tmp_path / "intmodel.py").write_text(INTEGER_ACTIVATION)
    assert main(["verify", f"{tmp_path / 'intmodel.py'}:{factory}"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("actreg verify: error: a regularized module of your model outputs what actreg ")
    assert "'quant': ValueError: expected a floating tensor" in err and "got a torch.int64 tensor" in err
    assert err.count("\n") == 1, err
    assert launches == []


def test_tensorboard_missing_is_a_usage_error(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    launches: list[object],
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard raises ImportError
    assert main(["train", *BASE, "--out", str(tmp_path), "--tensorboard"]) == 2
    err = capsys.readouterr().err
    assert "optional dependency 'tensorboard'" in err and "pip install 'actreg[tensorboard]'" in err
    assert launches == []


# ---------------------------------------------------------------------- the lock
@pytest.fixture(scope="module")
def holder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    """Another process holding the lock of a directory (as a running ``actreg train`` would)."""
    out = tmp_path_factory.mktemp("locked")
    env = {k: v for k, v in os.environ.items() if k != LOCK_ENV}
    argv = [sys.executable, "-c", HOLD_LOCK, str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield out, proc.pid
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_second_run_into_a_locked_directory_names_the_holder(
    holder: tuple[Path, int], launches: list[object], capsys: pytest.CaptureFixture[str]
) -> None:
    out, pid = holder
    assert main(["train", *BASE, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("actreg train: error: ") and f"in use by another actreg run (pid {pid} holds" in err
    assert launches == []


def test_rank_zero_under_plain_torchrun_refuses_a_locked_directory(holder: tuple[Path, int]) -> None:
    from actreg.demo.train import DistContext, run_training

    out, pid = holder
    cfg = TrainConfig(out=str(out), epochs=1, hidden=[8, 8], progress=False, plots=False).validate()
    with pytest.raises(SystemExit) as info:
        run_training(cfg, DistContext())
    assert f"error on rank 0: --out {out}: in use by another actreg run (pid {pid} holds" in str(info.value)


def test_workers_of_the_holder_do_not_lock_again(tmp_path: Path) -> None:
    """A process started by the holder (the command's workers) passes; others are refused (above)."""
    assert lock_run_directory(tmp_path) is True  # this process holds it now
    try:
        probe = "import sys\nfrom actreg.demo.rundir import lock_run_directory\n"
        argv = [sys.executable, "-c", probe + "print(lock_run_directory(sys.argv[1]))", str(tmp_path)]
        child = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert child.stdout.strip() == "False", child.stderr  # a descendant: the holder's lock covers it
    finally:
        unlock_run_directory(tmp_path)


# ---------------------------------------------------------------------- worker side
def test_worker_refuses_a_reused_directory_and_overwrite_replaces_it(tmp_path: Path) -> None:
    from actreg.demo.train import DistContext, run_training

    _checkpoint(tmp_path, 12)
    (tmp_path / "metrics.jsonl").write_text('{"type": "epoch", "epoch": 12}\n')
    cfg = TrainConfig(out=str(tmp_path), epochs=1, hidden=[8, 8], batch_size=512, progress=False, plots=False)
    with pytest.raises(SystemExit, match="holds another run's checkpoints"):
        run_training(cfg.validate(), DistContext())
    cfg.overwrite = True
    result = run_training(cfg.validate(), DistContext())
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch_001.pt"]
    assert [r["epoch"] for r in result.epochs] == [1]
    assert "epoch\": 12" not in (tmp_path / "metrics.jsonl").read_text()
