"""One run per output_dir: `.loraforge.lock` names the owner (pid, host, start, command) and is held with an
exclusive `flock` for as long as the run lives.

The kernel releases a flock when its process dies however it dies (`kill -9`, a crash, the OOM killer), so a
lock file left behind is recognised as stale by the next run, which simply takes it over; pid checks and
timeouts are not needed. The file's content is only for the message that names the holder.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
from pathlib import Path

from loraforge.errors import ConfigError, Problem

LOCK_FILE = ".loraforge.lock"
_held: dict[Path, int] = {}  # resolved run dir -> open, flocked file descriptor (this process)


class RunLocked(ConfigError):
    title = "output_dir is in use"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def holder(run_dir: str | Path) -> dict | None:
    """The live process holding `run_dir`'s lock ({pid, host, started, command}), or None (free or stale)."""
    import fcntl

    path = Path(run_dir) / LOCK_FILE
    if Path(run_dir).resolve() in _held or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read(path) or {"pid": "?"}
    finally:
        os.close(fd)
    return None


def holder_problem(run_dir: str | Path, who: dict) -> Problem:
    return Problem("output_dir", f"another run is using this folder: pid {who.get('pid', '?')} on "
                                 f"{who.get('host', '?')} since {who.get('started', '?')} (`{who.get('command', '?')}`)",
                   value=str(run_dir), fix="wait for that run to end or stop it, or pick another output_dir")


def acquire(run_dir: str | Path) -> Path:
    """Take `run_dir`'s lock (creating the folder); held until `release` or the end of this process.

    Raises:
        RunLocked: a live process holds it; the message names its pid, host, start time and command.
    """
    import fcntl

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key, path = run_dir.resolve(), run_dir / LOCK_FILE
    if key in _held:
        return path
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLocked([holder_problem(run_dir, _read(path) or {})]) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file between our open and flock: try the new one
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])[:200]}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(record).encode())
    _held[key] = fd
    if len(_held) == 1:
        atexit.register(_release_all)
    return path


def release(run_dir: str | Path) -> None:
    """Give the lock back (remove the file first, so nobody takes over a file about to vanish)."""
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is None:
        return
    (Path(run_dir) / LOCK_FILE).unlink(missing_ok=True)
    os.close(fd)


def _release_all() -> None:
    for key in list(_held):
        release(key)


def is_main_process() -> bool:
    """Rank 0 of `accelerate launch` / torchrun (they set RANK), or a plain single process."""
    return os.environ.get("RANK", "0") in ("", "0")


def holds_output_dir(train_fn):
    """Decorator for a recipe `train(cfg, ...)`: check that `cfg.output_dir` may receive a run (not a model folder,
    not inside the base, writable), then hold its lock for the whole call. Only the main process locks; the other
    ranks of a distributed run share its folder."""
    import functools

    @functools.wraps(train_fn)
    def wrapper(cfg, *args, **kwargs):
        from loraforge.train.rundir import base_model_dirs, output_dir_problems

        problems = output_dir_problems(cfg.output_dir, base_model_dirs(cfg.base_model))
        if problems:
            raise ConfigError(problems)
        if not is_main_process():
            return train_fn(cfg, *args, **kwargs)
        acquire(cfg.output_dir)
        try:
            return train_fn(cfg, *args, **kwargs)
        finally:
            release(cfg.output_dir)

    return wrapper
