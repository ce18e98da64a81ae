"""Faults around the ``actreg`` command's workers: failures, kill -9, interrupts, teardown crashes.

The promises (``actreg.demo.distributed``'s worker protocol and ``actreg.demo.launch``):

* a rank that fails -- also inside the workers, after the process group is up -- stops every rank at
  once and its error is shown (no barrier on an error path; gloo's timeout is 30 minutes, so a hang
  fails these tests through their hang guard);
* workers do not outlive the ``actreg`` process (``kill -9`` included);
* SIGINT / SIGTERM stop the run with one line, exit status 130 / 143, the last checkpoint intact;
* a crash in the workers' teardown after the results are complete is a note, not a failure;
* ``actreg verify`` passes every example of docs/cli.md, and tells "your factory raised" (exit 3)
  from FAIL (exit 1).

Commands run in subprocesses (``python -m actreg.cli``) where a hang or a signal is part of the test,
in-process (``actreg.cli.main``) otherwise. Runs are tiny: 2 ranks, hidden 16,16, batch 256.
"""

from __future__ import annotations

import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from actreg.cli import main
from actreg.demo.distributed import FAULT_ENV

pytest.importorskip("sklearn")
pytest.importorskip("rich")

TINY = ["--nproc", "2", "--hidden", "16,16", "--batch-size", "256", "--no-progress", "--no-plots"]
HANG_GUARD_S = 240  # far below gloo's 30-minute timeout, far above a loaded machine's start-up
DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _cli(
    args: list[str], *, cwd: Path | None = None, preexec_fn: Callable[[], None] | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "actreg.cli", *args],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        cwd=cwd,
        env=_env(**env),
        preexec_fn=preexec_fn,
    )


def _alive_with(text: str) -> list[int]:
    """Pids of live (not zombie) processes whose command line contains ``text``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def _wait_for(condition: Callable[[], object], what: str, limit_s: float = HANG_GUARD_S) -> None:
    end = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"hang guard: {what} did not happen within {limit_s}s")
        time.sleep(0.1)


def _kill_leftovers(text: str) -> list[int]:
    """End processes this test started that are still alive (a failed test must not leave them)."""
    pids = _alive_with(text)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


# ---------------------------------------------------------------------- 1. a failing rank stops all
def _full_disk() -> None:
    """A file-size limit: rank 0's writes past it fail with EFBIG (like a full disk)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


def test_rank0_failing_mid_training_stops_every_rank(tmp_path: Path) -> None:
    """Rank 0 fails inside the workers (its checkpoint write hits a full disk) while rank 1 waits in a
    collective: both stop at once, rank 0's error is shown, the command names it and exits 1."""
    out = tmp_path / "full-disk"
    # Hidden 128,64: a checkpoint (~220 kB) is the first file past the limit; metrics.jsonl stays below.
    args = [*TINY, "--hidden", "128,64", "--epochs", "3", "--out", str(out)]
    try:
        proc = _cli(["train", *args], preexec_fn=_full_disk)
    finally:
        leftovers = _kill_leftovers(str(out))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "actreg train: rank 0 failed:" in proc.stderr and "Traceback" in proc.stderr
    assert "File too large" in proc.stderr or "file write failed" in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("actreg train: error: actreg.demo.train failed on rank 0: "), last
    assert "File too large" in last  # the root of the exception chain, in the one-line summary
    assert not leftovers  # no worker outlived the command
    assert "rank 1 failed" not in proc.stderr  # a rank that lost its peer says so in one line


def _out_is_a_file(tmp_path: Path) -> tuple[list[str], str]:
    out = tmp_path / "taken"
    out.write_text("not a directory\n")
    return ["--out", str(out)], str(out)


def _checkpoints_is_a_file(tmp_path: Path) -> tuple[list[str], str]:
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("not a directory\n")
    return ["--out", str(out)], "checkpoints"


def _checkpoint_missing_keys(tmp_path: Path) -> tuple[list[str], str]:
    from actreg.demo.checkpoints import CHECKPOINT_VERSION

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    path = out / "checkpoints" / "epoch_001.pt"
    torch.save({"version": CHECKPOINT_VERSION, "epoch": 1}, path)
    return ["--out", str(out), "--resume"], path.name


@pytest.mark.parametrize(
    "trigger", [_out_is_a_file, _checkpoints_is_a_file, _checkpoint_missing_keys], ids=lambda f: f.__name__
)
def test_failure_triggers_exit_with_the_cause(
    trigger: Callable[[Path], tuple[list[str], str]], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The other triggers of issue 7 item 1: a non-zero exit (not a hang) whose error line names the
    cause -- found before any worker starts, or (if not) by the protocol above. In-process: fast."""
    args, cause = trigger(tmp_path)
    status = main(["train", *TINY, "--epochs", "2", *args])
    err = capfd.readouterr().err
    assert status in (1, 2), err
    (line,) = [x for x in err.splitlines() if x.startswith("actreg train: error: ")]
    assert cause in line, err


# ---------------------------------------------------------------------- 4. kill -9 of the command
def test_workers_do_not_outlive_a_killed_command(tmp_path: Path) -> None:
    out = tmp_path / "killed"
    cli = subprocess.Popen(
        [sys.executable, "-m", "actreg.cli", "train", *TINY, "--epochs", "100000", "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(),
    )
    try:
        # Training has begun on both ranks once the first epoch is on disk.
        _wait_for(lambda: (out / "metrics.jsonl").exists() or cli.poll() is not None, "the first epoch")
        assert cli.poll() is None, "the command ended early"
        workers = [pid for pid in _alive_with(str(out)) if pid != cli.pid]
        assert len(workers) == 2, workers
        cli.kill()
        cli.wait()
        _wait_for(lambda: not any(pid in workers for pid in _alive_with(str(out))), "the workers' end", 20)
    finally:
        cli.kill()
        cli.wait()
        _kill_leftovers(str(out))


# ---------------------------------------------------------------------- 11. interrupts
@pytest.mark.parametrize(
    ("signum", "to_group", "status"),
    [(signal.SIGINT, True, 130), (signal.SIGTERM, False, 143)],
    ids=["SIGINT-to-the-terminal-group", "SIGTERM-to-the-command"],
)
def test_interrupt_stops_with_one_line(
    signum: signal.Signals, to_group: bool, status: int, tmp_path: Path
) -> None:
    """Ctrl-C (SIGINT to the whole foreground group) or ``kill`` (SIGTERM to the command)."""
    out = tmp_path / "interrupted"
    cli = subprocess.Popen(
        [sys.executable, "-m", "actreg.cli", "train", *TINY, "--epochs", "100000", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        start_new_session=True,  # its own process group, as a terminal gives a command
    )
    try:
        _wait_for(lambda: list(out.glob("checkpoints/epoch_*.pt")) or cli.poll() is not None, "a checkpoint")
        assert cli.poll() is None, "the command ended early"
        if to_group:
            os.killpg(cli.pid, signum)
        else:
            os.kill(cli.pid, signum)
        stdout, stderr = cli.communicate(timeout=HANG_GUARD_S)
    finally:
        cli.kill()
        cli.wait()
        leftovers = _kill_leftovers(str(out))
    assert cli.returncode == status, stdout + stderr
    assert "Traceback" not in stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    expected = f"actreg train: interrupted by {signum.name}; the last complete checkpoint is "
    assert lines[0].startswith(expected), lines[0]
    assert lines[0].endswith("; continue with --resume")
    named = Path(re.search(r"checkpoint is (.+?); continue", lines[0]).group(1))  # type: ignore[union-attr]
    state = torch.load(named, map_location="cpu", weights_only=True)
    assert state["epoch"] >= 1 and {"fc1.weight", "head.bias"} <= set(state["model"])
    assert not leftovers


# ---------------------------------------------------------------------- 13. teardown crashes
def test_abort_in_teardown_after_the_report_is_a_note(tmp_path: Path) -> None:
    """gloo in torch 2.13 sometimes aborts at exit: after the results, that is not a failure."""
    out = tmp_path / "aborted"
    proc = _cli(["train", *TINY, "--epochs", "1", "--out", str(out)], **{FAULT_ENV: "abort-at-exit:1"})
    _kill_leftovers(str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "actreg train: note: rank 1 (SIGABRT) crashed in the process-group teardown" in proc.stderr
    assert (out / "report.md").exists() and "done in" in proc.stdout


# ---------------------------------------------------------------------- 5. verify
def _docs_verify_section() -> str:
    text = DOCS.read_text()
    return text[text.index("## `actreg verify`") : text.index("## Exit codes")]


def _docs_examples() -> tuple[list[tuple[list[str], int]], str]:
    """The ``actreg verify`` commands of docs/cli.md (with the exit status their comment promises)
    and its example factory file."""
    section = _docs_verify_section()
    bash = section.split("```bash", 1)[1].split("```", 1)[0]
    commands = []
    for line in bash.strip().splitlines():
        command, _, comment = line.partition("#")
        argv = shlex.split(command)
        assert argv[:2] == ["actreg", "verify"], line
        commands.append((argv[1:], 1 if "FAIL" in comment else 0))
    factory = section.split("```python", 1)[1].split("```", 1)[0]
    return commands, factory


def test_verify_every_example_of_the_docs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every ``actreg verify`` command of docs/cli.md with the docs' factory (whose last layer gets
    no gradient: DDP must still average the others, and 'no gradient' on both sides passes).

    The plain ``actreg verify`` runs with rank 0 aborting in its teardown after writing the result
    (item 13): the result is read, PASS, exit 0, and one note."""
    commands, factory = _docs_examples()
    assert len(commands) == 4
    (tmp_path / "my_model.py").write_text(factory)
    (tmp_path / "path" / "to").mkdir(parents=True)
    (tmp_path / "path" / "to" / "model.py").write_text(factory)
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "models.py").write_text(factory + "\nmake_problem = make\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for argv, status in commands:
        with monkeypatch.context() as m:
            if argv == ["verify"]:
                m.setenv(FAULT_ENV, "abort-at-exit:0")
            assert main(argv) == status, (argv, capsys.readouterr())
        out, err = capsys.readouterr()
        if argv == ["verify"]:
            assert "actreg verify: note: rank 0 (SIGABRT) crashed in the process-group teardown" in err
        verdict = "PASS" if status == 0 else "FAIL"
        assert f"{verdict}: " in out, (argv, out)
        if "make" in " ".join(argv):  # the docs' factory: layer 3 gets no gradient in either run
            assert re.search(r"3\.weight\s+\(4, 16\)\s+no gradient in either run", out), out


def test_verify_factory_that_raises_is_not_a_fail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.py"
    path.write_text("def make():\n    raise ValueError('no data here')\n")
    assert main(["verify", f"{path}:make"]) == 3
    err = capsys.readouterr().err
    assert f"actreg verify: error: your factory {path}:make() raised ValueError: no data here" in err
    assert f'File "{path}", line 2, in make' in err  # the user's traceback, without actreg's frames
    assert "actreg/demo" not in err


def test_verify_factory_that_raises_in_a_worker_is_not_a_fail(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "flaky.py"
    path.write_text(
        "import os, torch\nfrom torch import nn\nimport actreg\n\n"
        "def make():\n"
        "    if 'RANK' in os.environ:\n"
        "        raise RuntimeError('only works in one process')\n"
        "    return nn.Sequential(nn.Linear(3, 4), nn.Tanh()), torch.randn(5, 3), {'1': actreg.L2(1.0)}\n"
    )
    assert main(["verify", f"{path}:make"]) == 3
    err = capsys.readouterr().err
    assert "actreg verify: error: your code raised in a worker" in err
    assert "RuntimeError: only works in one process" in err
