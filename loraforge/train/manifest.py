"""A checkpoint's checksum manifest: "complete" means every file is there with the bytes that were written.

`manifest.json` is written last inside the checkpoint's temporary folder (after `trainer_state.json`), listing
each file's size and SHA-256. `verify` re-reads them; `newest_intact` is what `resume_from_checkpoint: latest`
uses, so a checkpoint truncated or damaged after it was written (a full disk on a copy, a bad sync, a hand
edit) is skipped with a message and the run resumes from the newest one that verifies.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Callable

from loraforge.atomic import atomic_write_text
from loraforge.errors import ConfigError, Problem

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: str | Path) -> Path:
    """Record size and SHA-256 of every file in `folder` (call it after the last file is written)."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in _files(folder)}
    path = folder / MANIFEST
    atomic_write_text(path, json.dumps({"version": 1, "files": files}, indent=1))
    return path


def verify(folder: str | Path) -> str | None:
    """None when `folder` matches its manifest, else the first reason it does not (one sentence)."""
    folder = Path(folder)
    try:
        files = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (written last: the checkpoint was never completed, or predates checksums)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} is unreadable ({err})"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size} bytes, {want['bytes']} were written (truncated or changed)"
        if _sha256(path) != want["sha256"]:
            return f"{name} does not match its checksum (damaged or changed)"
    return None


def newest_intact(checkpoints: list[Path], warn: Callable[[str], None] | None = None) -> Path | None:
    """The newest of `checkpoints` (oldest first) that verifies; each skipped one is reported through `warn`.
    A checkpoint written before manifests existed (no manifest.json) is used, with a note that it is unverified."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    for ckpt in reversed(checkpoints):
        if not (ckpt / MANIFEST).exists():
            warn(f"note: {ckpt} has no {MANIFEST} (written by an older loraforge): using it unverified")
            return ckpt
        reason = verify(ckpt)
        if reason is None:
            return ckpt
        warn(f"warning: skipping {ckpt}: {reason}")
    return None


def resumable_checkpoint(run_dir: Path, warn: Callable[[str], None] | None = None) -> Path | None:
    """What `resume_from_checkpoint: latest` resumes: the newest complete checkpoint that verifies."""
    from loraforge.train.checkpoint_files import list_checkpoints

    return newest_intact(list_checkpoints(Path(run_dir)), warn)


def require_intact(ckpt: Path, *, key: str = "resume_from_checkpoint") -> None:
    """Raises:
        ConfigError: an explicitly named checkpoint fails verification (the reason, and what to do)."""
    reason = verify(ckpt) if (ckpt / MANIFEST).exists() else None  # older checkpoints carry no manifest
    if reason is not None:
        raise ConfigError([Problem(key, f"checkpoint is damaged: {reason}", value=str(ckpt),
                                   fix="resume from another checkpoint (`latest` picks the newest intact one), or "
                                       "start over with overwrite_output_dir: true")])
