"""The run directory (``--out``): checked before a run, locked during it, never silently mixed.

* :func:`prepare_output` -- ``--out`` must be (or become) a writable directory, ``checkpoints`` a
  directory in it: checked before any worker starts, not after the first epoch.
* :func:`lock_run_directory` -- ``fcntl.flock`` on ``<out>/.lock`` for the whole run (the ``actreg``
  process holds it for its workers; under a plain ``torchrun`` rank 0 holds it). A second run into
  the same directory is refused, naming the holder's pid. The lock goes with the process that holds
  it, also on ``kill -9``.
* :func:`check_reuse` -- a new run into a directory that holds another run's checkpoints is refused
  unless ``--resume`` (continue it) or ``--overwrite`` (:func:`clear_previous_run` deletes them).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .checkpoints import checkpoint_dir, list_checkpoints
from .config import TrainConfig

try:
    import fcntl
except ImportError:  # pragma: no cover - not a POSIX system: no lock
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
#: ``"<pid>:<directory>"``: set by the process holding a run directory's lock, for its workers.
LOCK_ENV = "ACTREG_RUN_LOCK"
TENSORBOARD_DIR = "tensorboard"

_held: dict[Path, int] = {}  # directories locked by this process -> lock file descriptor


def _error(out: str | Path, problem: str, remedy: str) -> ValueError:
    return ValueError(f"--out {out}: {problem}; {remedy}")


def _make_dir(path: Path, out: str | Path, what: str) -> None:
    if path.exists() and not path.is_dir():
        raise _error(out, f"{path} is an existing file, not a directory", "move it or give another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        problem = f"cannot create {what} {path} ({err.strerror or err})"
        raise _error(out, problem, "give a writable --out") from None


def prepare_output(out: str | Path, *, tensorboard: bool = False, checkpoints: bool = True) -> None:
    """Create ``out`` and ``out/checkpoints`` (and ``out/tensorboard``) and check that they are writable.

    ``checkpoints=False``: ``out`` alone (``actreg compare``'s top directory, whose runs each have
    their own ``out/<mode>/checkpoints``).
    """
    root = Path(out)
    _make_dir(root, out, "the output directory")
    dirs = ([checkpoint_dir(root)] if checkpoints else []) + ([root / TENSORBOARD_DIR] if tensorboard else [])
    for path in dirs:
        _make_dir(path, out, "the directory")
    for path in [root, *dirs]:
        try:
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as err:
            problem = f"cannot write in {path} ({err.strerror or err})"
            raise _error(out, problem, "give a writable --out") from None


# ---------------------------------------------------------------------- lock
def _ancestors() -> set[int]:
    """The pids of this process's parent, grandparent, ... (Linux ``/proc``; else the parent only)."""
    pids, pid = set(), os.getppid()
    for _ in range(64):
        if pid <= 1 or pid in pids:
            break
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
                pid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def _held_by_ancestor(directory: Path) -> bool:
    """Whether the process that started this one holds the lock of ``directory`` (or of a parent dir)."""
    pid, _, held = os.environ.get(LOCK_ENV, "").partition(":")
    if not pid.isdigit() or not held:
        return False
    held_dir = Path(held)
    return (held_dir == directory or held_dir in directory.parents) and int(pid) in _ancestors()


def lock_run_directory(out: str | Path) -> bool:
    """Lock ``out`` for this process; True if this call took the lock (release it when done).

    False when this process or the process that started it (the ``actreg`` command, for its
    workers) already holds it. Raises ``ValueError`` naming the holder's pid when another process
    holds it.
    """
    directory = Path(out).resolve()
    if fcntl is None or directory in _held or _held_by_ancestor(directory):
        return False
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise _error(
            out,
            f"in use by another actreg run (pid {holder} holds {directory / LOCK_NAME})",
            "wait for it to finish, stop it, or give another --out",
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[directory] = fd
    os.environ[LOCK_ENV] = f"{os.getpid()}:{directory}"
    return True


def unlock_run_directory(out: str | Path) -> None:
    """Release this process's lock of ``out`` (if it holds one)."""
    fd = _held.pop(Path(out).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


# ---------------------------------------------------------------------- reuse
def check_reuse(cfg: TrainConfig, out: str | Path | None = None) -> None:
    """Refuse a new run (no ``--resume``/``--overwrite``) into a directory with another run's checkpoints."""
    run_dir = Path(cfg.out if out is None else out)
    if cfg.resume or cfg.overwrite:
        return
    found = list_checkpoints(run_dir)
    if found:
        names = ", ".join(p.name for p in found)
        raise _error(
            run_dir,
            f"holds another run's checkpoints ({names})",
            "continue that run with --resume, replace it with --overwrite (deletes its checkpoints and "
            "metrics), or give another --out",
        )


def clear_previous_run(out: str | Path) -> list[Path]:
    """``--overwrite``: delete the checkpoints, ``metrics.jsonl`` and TensorBoard events of ``out``."""
    root = Path(out)
    doomed = list(list_checkpoints(root))
    if checkpoint_dir(root).is_dir():
        doomed += sorted(checkpoint_dir(root).glob("epoch_*.pt.damaged"))
    if (root / TENSORBOARD_DIR).is_dir():
        doomed += sorted((root / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    doomed += [p for p in [root / "metrics.jsonl"] if p.is_file()]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed
