"""A full disk during a checkpoint: a clear "no space left … (needed ≈ N MB)", the earlier checkpoint intact."""

import os
import subprocess

import pytest

from test_train_helpers import rows_file, run, tiny_llama  # noqa: F401


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs (needs root and mount permission: skipped where CI cannot mount)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root and CAP_SYS_ADMIN")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(folder, leave: int) -> None:
    """Fill the file system of `folder` until `leave` bytes are free."""
    import shutil

    free = shutil.disk_usage(folder).free - leave
    with open(folder / "filler", "wb") as f:
        while free > 0:
            n = min(free, 1 << 20)
            f.write(b"\0" * n)
            free -= n


@pytest.mark.parametrize("when", ["before", "during"])
def test_full_disk_at_a_checkpoint(small_disk, tiny_llama, rows_file, monkeypatch, when):
    from loraforge.train import space
    from loraforge.train.space import DiskFull

    out = small_disk / "run"
    real_needed = space.needed_bytes
    calls = []

    def needed(run_dir, optimizer):
        calls.append(1)
        if len(calls) == 2:  # after checkpoint-1: the disk fills up
            _fill(small_disk, leave=4096)
            if when == "during":
                return 0  # the estimate says it fits: the write itself must fail cleanly
        return real_needed(run_dir, optimizer)

    monkeypatch.setattr(space, "needed_bytes", needed)
    with pytest.raises(DiskFull) as e:
        run(tiny_llama, rows_file, out, max_steps=4, save_steps=1)
    text = e.value.format()
    assert "no space left on" in text and "needed ≈" in text and "MB" in text, text
    assert "basic_ios" not in text.split("(")[0]
    assert f"last checkpoint ({out / 'checkpoint-1'}) is intact" in text
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint-", ".tmp-"))) == ["checkpoint-1"]
    from loraforge.train.manifest import verify

    assert verify(out / "checkpoint-1") is None
