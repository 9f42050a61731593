"""Write a file or a directory so that readers see either the old one or the complete new one, never half.

Every "write to a temporary name, then rename" in loraforge goes through here: checkpoints, merged models,
converted models, exports, caches. A crash, Ctrl-C or a full disk leaves the previous version in place and at
most a `.tmp-*` sibling, which the next writer removes.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def tmp_sibling(final: Path) -> Path:
    """The temporary name used while `final` is being written (same folder, so the rename is atomic)."""
    return final.with_name(f".tmp-{final.name}")


@contextlib.contextmanager
def atomic_dir(final: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it becomes `final`, on any error it is removed.

    `replace=False` refuses (FileExistsError) when `final` already exists instead of replacing it.
    """
    final = Path(final)
    if final.exists() and not replace:
        raise FileExistsError(final)
    tmp = tmp_sibling(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if final.exists():
            # A directory cannot be os.replace()d over a non-empty one; the window between the two calls
            # holds the complete new version under the temporary name.
            old = final.with_name(f".old-{final.name}")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and os.replace (atomic on POSIX and Windows)."""
    path = Path(path)
    tmp = tmp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))
