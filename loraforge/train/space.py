"""Disk space around checkpoint saves: check before writing, and say "no space left" when a write fails.

A checkpoint is written into a temporary folder and renamed when complete (`train/checkpoint.py`), so running
out of space never damages the previous checkpoint; what was missing is the message. torch.save reports a
full disk as `RuntimeError: basic_ios::clear` or `file write failed`, which names neither the disk nor the cause.
"""

from __future__ import annotations

import errno
import functools
import shutil
from pathlib import Path

from loraforge.errors import LoraforgeError, Problem

MB = 1 << 20
_DISK_FULL_TEXT = ("basic_ios::clear", "file write failed", "no space left", "unexpected pos")


class DiskFull(LoraforgeError):
    title = "out of disk space (training stopped)"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def needed_bytes(run_dir: Path, optimizer) -> int:
    """What the next checkpoint will take: the size of the previous one, else the trainable weights plus the
    optimizer's state (Adam: two moments per weight), each with 10% to spare."""
    from loraforge.train.checkpoint_files import list_checkpoints

    previous = list_checkpoints(run_dir)
    if previous:
        return int(folder_bytes(previous[-1]) * 1.1)
    params = sum(p.numel() * p.element_size() for g in optimizer.param_groups for p in g["params"])
    return int(params * 3 * 1.1) + MB


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def _problem(run_dir: Path, needed: int, free: int, what: str) -> Problem:
    from loraforge.train.checkpoint_files import list_checkpoints

    kept = list_checkpoints(run_dir)
    return Problem("output_dir", f"{what}: no space left on {run_dir} (needed ≈ {needed / MB:.1f} MB, "
                                 f"free {free / MB:.1f} MB)", value=str(run_dir),
                   fix=f"free disk space or choose an output_dir on a larger disk; the last checkpoint "
                       f"({kept[-1] if kept else 'none yet'}) is intact and `resume_from_checkpoint: latest` continues it")


def is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(err, RuntimeError) and any(t in str(err).lower() for t in _DISK_FULL_TEXT)


def guard_disk_space(save_checkpoint):
    """Decorator for `save_checkpoint(run_dir, state, save_model, optimizer, ...)`: refuse to start a save that
    cannot fit, and turn a full disk during the save into `DiskFull` (the partial temp folder removed)."""

    @functools.wraps(save_checkpoint)
    def wrapper(run_dir, state, save_model, optimizer, *args, **kwargs):
        run_dir = Path(run_dir)
        needed = needed_bytes(run_dir, optimizer)
        free = free_bytes(run_dir)
        name = f"checkpoint-{state.global_step}"
        if free < needed:
            raise DiskFull([_problem(run_dir, needed, free, f"{name} would not fit")])
        try:
            return save_checkpoint(run_dir, state, save_model, optimizer, *args, **kwargs)
        except (OSError, RuntimeError) as err:
            if not is_disk_full(err) and free_bytes(run_dir) > MB:
                raise
            for tmp in run_dir.glob(f".tmp-{name}"):
                shutil.rmtree(tmp, ignore_errors=True)
            raise DiskFull([_problem(run_dir, needed, free_bytes(run_dir), f"writing {name} failed ({err})")]) from None

    return wrapper
