"""loraforge.atomic: a failed write leaves the old version and no temporary sibling; a successful one replaces the
old version whole; two writers of one target never mix their bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraforge.atomic import atomic_dir, atomic_open, atomic_write_bytes, atomic_write_text


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _old_dir(tmp_path: Path) -> Path:
    final = tmp_path / "model"
    final.mkdir()
    (final / "weights.bin").write_text("old weights")
    (final / "only-in-old.txt").write_text("x")
    return final


def test_a_failed_directory_write_leaves_the_old_version_and_no_temp(tmp_path):
    final = _old_dir(tmp_path)
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_dir(final) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-model-") and _siblings(tmp) == []
            (tmp / "weights.bin").write_text("half")
            raise RuntimeError("disk full")
    assert _siblings(tmp_path) == ["model"]
    assert (final / "weights.bin").read_text() == "old weights" and (final / "only-in-old.txt").is_file()


def test_a_successful_directory_write_replaces_the_old_version_whole(tmp_path):
    final = _old_dir(tmp_path)
    with atomic_dir(final) as tmp:
        (tmp / "weights.bin").write_text("new weights")
        assert (final / "weights.bin").read_text() == "old weights"  # readers see the old one until the end
    assert _siblings(tmp_path) == ["model"]
    assert _siblings(final) == ["weights.bin"] and (final / "weights.bin").read_text() == "new weights"


def test_a_directory_write_creates_missing_parents(tmp_path):
    with atomic_dir(tmp_path / "a" / "b" / "model") as tmp:
        (tmp / "f").write_text("1")
    assert (tmp_path / "a" / "b" / "model" / "f").read_text() == "1"
    assert _siblings(tmp_path / "a" / "b") == ["model"]


def test_replace_false_refuses_an_existing_target_before_and_after_writing(tmp_path):
    final = _old_dir(tmp_path)
    with pytest.raises(FileExistsError):
        with atomic_dir(final, replace=False):
            pytest.fail("the body must not run")
    other = tmp_path / "other"
    with pytest.raises(FileExistsError):
        with atomic_dir(other, replace=False) as tmp:
            (tmp / "mine").write_text("late")
            other.mkdir()  # another process finished first
            (other / "theirs").write_text("first")
    assert _siblings(other) == ["theirs"] and _siblings(tmp_path) == ["model", "other"]


def test_a_failed_file_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "run.json"
    path.write_text("old")
    with pytest.raises(ValueError):
        with atomic_open(path) as f:
            f.write("{half")
            raise ValueError("serialization failed")
    assert path.read_text() == "old" and _siblings(tmp_path) == ["run.json"]
    atomic_write_text(path, "new ✓")
    assert path.read_text(encoding="utf-8") == "new ✓" and _siblings(tmp_path) == ["run.json"]
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01" and _siblings(tmp_path) == ["run.json"]


def test_two_writers_of_one_file_never_mix(tmp_path):
    path = tmp_path / "bundle.json"
    with atomic_open(path) as first:
        first.write("A" * 1000)
        with atomic_open(path) as second:  # a parallel run writing the same cache entry
            second.write("B" * 10)
        assert path.read_text() == "B" * 10
        first.write("A" * 1000)
    assert path.read_text() == "A" * 2000 and _siblings(tmp_path) == ["bundle.json"]


def test_atomic_open_refuses_modes_that_are_not_a_fresh_write(tmp_path):
    with pytest.raises(ValueError, match="mode must be"):
        with atomic_open(tmp_path / "x", "a"):
            pass


def test_a_run_dir_start_removes_leftovers_of_a_crashed_write_and_keeps_checkpoints(tmp_path):
    pytest.importorskip("torch")
    from loraforge.train.checkpoint import STATE_FILE, clean_partial

    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / STATE_FILE).write_text("{}")
    for name in (".tmp-checkpoint-4-123-abcd", ".tmp-best-9-ff", ".old-best-9-ff"):
        (tmp_path / name).mkdir()
    (tmp_path / ".tmp-run.json-1-aa").write_text("{")
    clean_partial(tmp_path)
    assert _siblings(tmp_path) == ["checkpoint-2"]
