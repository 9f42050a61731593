"""No command damages a model folder, and one run per output_dir (issue 22, points 1, 2 and 10's paths)."""

import hashlib
import os
import signal
import subprocess
import sys

import pytest

from test_train_helpers import REPO, cli_env, make_cfg, records, rows_file, run, start_cli, stop, tiny_llama, wait_for, write_config  # noqa: F401


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _cfg(model_dir, data, out, method="lora", **overrides):
    """make_cfg for any method (lora_dropout only exists for LoRA)."""
    from loraforge.config import config_from_dict

    raw = make_cfg(model_dir, data, out, **overrides).model_dump(mode="json", exclude_unset=True)
    if method != "lora":
        raw.pop("lora_dropout", None)
    return config_from_dict({**raw, "method": method})


def _preflight_problems(cfg):
    from loraforge.preflight import PreflightError, run_preflight

    with pytest.raises(PreflightError) as e:
        run_preflight(cfg, echo=lambda _m: None)
    return e.value.problems


@pytest.mark.parametrize("where", ["same", "inside", "symlink"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_output_dir_in_the_base_model_is_refused_and_the_model_untouched(tiny_llama, rows_file, tmp_path, where, method):
    out = {"same": tiny_llama, "inside": tiny_llama / "run"}.get(where)
    if where == "symlink":
        out = tmp_path / "link"
        out.symlink_to(tiny_llama, target_is_directory=True)
    before = _digest(tiny_llama)
    problems = _preflight_problems(_cfg(tiny_llama, rows_file, out, method))
    assert any(p.key == "output_dir" and "base model folder" in p.message for p in problems), problems
    from loraforge.errors import ConfigError

    from loraforge.train.loop import train

    with pytest.raises(ConfigError, match="base model folder"):  # the library call is guarded too
        train(_cfg(tiny_llama, rows_file, out, method), echo=lambda _m: None)
    assert _digest(tiny_llama) == before
    assert not (tiny_llama / "run").exists()


def test_output_dir_that_is_another_model_folder_is_refused(tiny_llama, rows_file, tmp_path):
    import shutil

    other = tmp_path / "other-model"
    shutil.copytree(tiny_llama, other)
    problems = _preflight_problems(make_cfg(tiny_llama, rows_file, other))
    assert any(p.key == "output_dir" and "model folder" in p.message for p in problems), problems


def test_output_dir_that_is_a_file_or_cannot_be_created(tiny_llama, rows_file, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    problems = _preflight_problems(make_cfg(tiny_llama, rows_file, afile))
    assert any(p.key == "output_dir" and "is a file" in p.message for p in problems), problems
    problems = _preflight_problems(make_cfg(tiny_llama, rows_file, afile / "sub"))
    assert any(p.key == "output_dir" and "cannot be created" in p.message for p in problems), problems
    if os.path.isdir("/proc/self"):
        problems = _preflight_problems(make_cfg(tiny_llama, rows_file, "/proc/self/loraforge-run"))
        assert any(p.key == "output_dir" and "cannot be created" in p.message for p in problems), problems


_HOLD = "import sys, time; from loraforge.train.lock import acquire; acquire(sys.argv[1]); print('held', flush=True); time.sleep(600)"


def _holder(out):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_is_refused_naming_the_holder_and_a_stale_lock_is_taken_over(tiny_llama, rows_file, tmp_path):
    from loraforge.train.lock import LOCK_FILE, RunLocked, acquire, release

    out = tmp_path / "run"
    proc = _holder(out)
    try:
        problems = _preflight_problems(make_cfg(tiny_llama, rows_file, out))
        assert any(f"pid {proc.pid}" in p.message for p in problems), problems
        with pytest.raises(RunLocked, match=f"pid {proc.pid}"):
            run(tiny_llama, rows_file, out)
        assert not list(out.glob("checkpoint-*")) and not (out / "metrics.jsonl").exists()
    finally:
        proc.kill()  # kill -9: the lock file stays behind, stale
        proc.wait()
    assert (out / LOCK_FILE).is_file()
    result = run(tiny_llama, rows_file, out, max_steps=1)  # takes the stale lock over
    assert result.global_step == 1
    assert not (out / LOCK_FILE).exists()  # released when train() returns
    acquire(out)  # re-entrant in one process, released again
    acquire(out)
    release(out)
    assert not (out / LOCK_FILE).exists()


def test_other_ranks_of_a_distributed_run_do_not_see_their_main_process_lock(tiny_llama, rows_file, tmp_path,
                                                                             monkeypatch):
    """Under torchrun rank 0 takes the lock before rank 1's preflight may run: rank 1 must not refuse its own job
    (it did: `another run is using this folder` in the FSDP2 resume test). Rank 0 still refuses another job."""
    out = tmp_path / "run"
    proc = _holder(out)
    try:
        cfg = make_cfg(tiny_llama, rows_file, out)
        monkeypatch.setenv("RANK", "1")
        from loraforge.preflight import run_preflight

        run_preflight(cfg, echo=lambda _m: None)  # no problem at all
        monkeypatch.setenv("RANK", "0")
        assert [p for p in _preflight_problems(cfg) if f"pid {proc.pid}" in p.message]
    finally:
        proc.kill()
        proc.wait()


def test_two_train_processes_on_one_output_dir(tiny_llama, rows_file, tmp_path):
    out = tmp_path / "run"
    first = start_cli(write_config(make_cfg(tiny_llama, rows_file, out, max_steps=100000), tmp_path / "a.yaml"),
                      log_dir=tmp_path / "logs-a")
    try:
        wait_for(lambda: len(records(out)) >= 1, first, what="first run training")
        second = subprocess.run([sys.executable, "-m", "loraforge", "train", str(tmp_path / "a.yaml")], cwd=REPO,
                                env=cli_env(), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"pid {first.pid}" in second.stderr and "another run is using this folder" in second.stderr
        assert first.poll() is None  # the first run is unharmed and still training
    finally:
        stop(first, signal.SIGTERM)
    steps = [r["step"] for r in records(out) if "loss" in r]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no interleaved records
