"""Write a file or a directory so that readers see either the old one or the complete new one, never half.

Every "write to a temporary name, then rename" in loraforge goes through here: checkpoints, merged models,
converted models, exports, caches. A crash, Ctrl-C or a full disk leaves the previous version in place and at
most a `.tmp-<name>-*` sibling (a run removes its own run dir's ones when it starts). Each writer's temporary name
is its own, so two processes writing the same target (parallel runs filling one cache) never write into each
other's half-written copy: the last complete one wins.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def tmp_sibling(final: Path) -> Path:
    """A fresh temporary name for writing `final`: same folder (so the rename is atomic), unique to this writer."""
    return final.with_name(f".tmp-{final.name}-{os.getpid()}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def atomic_dir(final: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it becomes `final`, on any error it is removed.

    `replace=False` refuses (FileExistsError) when `final` already exists instead of replacing it.
    """
    final = Path(final)
    if final.exists() and not replace:
        raise FileExistsError(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            if not replace:  # another writer finished first
                raise FileExistsError(final)
            # A directory cannot be os.replace()d over a non-empty one; the window between the two calls
            # holds the complete new version under the temporary name.
            old = tmp.with_name(tmp.name.replace(".tmp-", ".old-", 1))
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Yield a temporary file open for writing (`mode` "w" or "wb"); on success it replaces `path` through
    os.replace (atomic on POSIX and Windows), on any error it is removed. For content too big to hold in memory."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a new file: mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    tmp = tmp_sibling(path)
    try:
        with open(tmp, mode.replace("w", "x"), encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and os.replace (atomic on POSIX and Windows)."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))
