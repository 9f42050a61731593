"""Several processes from the web UI: `processes: N` makes the child `torchrun --standalone --nproc_per_node N
-m loraforge train CONFIG` (an argument list), checked against the machine, with the estimate per process; stop
reaches every worker through torchrun and resume starts the same number again. The real run is 2 CPU processes
(gloo) on a tiny random LLaMA."""

from __future__ import annotations

import os
import sys
import time

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from loraforge.webui import app as webui_app  # noqa: E402
from test_train_helpers import write_rows  # noqa: E402

CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (gloo) path and the core count")


@pytest.fixture
def ws(tmp_path):
    root = tmp_path / "ws"
    (root / "data").mkdir(parents=True)
    write_rows(root / "data" / "train.jsonl", 16)
    return root


def client(root) -> TestClient:
    return TestClient(webui_app.create_app(root), base_url="http://127.0.0.1:7860")


@CPU_ONLY
def test_processes_are_checked_and_shown_as_the_torchrun_command(ws):
    c = client(ws)
    values = {"metadata_path": "data/train.jsonl"}
    cores = os.cpu_count() or 1
    for bad, message in (("0", "must be a whole number"), ("two", "must be a whole number"),
                         (str(cores + 1), f"more processes than this machine has CPU cores ({cores})")):
        r = c.post("/api/check", json={"values": values, "processes": bad}).json()
        p = r["problems"][0]
        assert (p["key"], p["allowed"]) == ("processes", f"1–{cores}") and message in p["message"], p
        assert r["cli"] == "loraforge train config.yaml"
    r = c.post("/api/check", json={"values": values, "processes": "2", "path": "configs/a.yaml"}).json()
    assert r["problems"] == [] and r["cli"] == "torchrun --standalone --nproc_per_node 2 -m loraforge train configs/a.yaml"
    assert "processes" not in r["yaml"]  # a launch option, not a config key
    assert c.post("/api/train", json={"values": values, "processes": "0"}).json()["problems"][0]["key"] == "processes"
    # what FSDP2 refuses shows before the start, on its field
    r = c.post("/api/check", json={"values": {**values, "sharding": "fsdp2", "method": "qlora"}}).json()
    assert [p["key"] for p in r["problems"]] == ["method"] and "FSDP2" in r["problems"][0]["message"]


def _wait(cond, timeout=120.0, what=""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@CPU_ONLY
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPU cores for 2 processes")
def test_a_two_process_run_from_the_ui_stops_and_resumes_on_two_processes(ws):
    from loraforge.models.tiny import tiny_model_dir

    model = tiny_model_dir("llama", ws / "models")
    app = webui_app.create_app(ws)
    c = TestClient(app, base_url="http://127.0.0.1:7860")
    jobs = app.state.webui.jobs
    values = {"base_model": str(model.relative_to(ws)), "metadata_path": "data/train.jsonl", "output_dir": "output/mp",
              "max_steps": "4000", "save_steps": "4000", "logging_steps": "1", "batch_size": "2", "cutoff_len": "64",
              "target_modules": "all-linear"}
    est = c.post("/api/preflight", json={"values": values, "processes": "2"}).json()
    assert est["problems"] == [] and est["estimate"]["processes"] == 2, est
    assert any("DDP over 2 processes" in n for n in est["estimate"]["notes"])

    r = c.post("/api/train", json={"values": values, "processes": "2", "path": "configs/mp.yaml"}).json()
    assert r["cli"] == "torchrun --standalone --nproc_per_node 2 -m loraforge train configs/mp.yaml", r
    rec = jobs.job(r["job"])
    assert rec["argv"] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "loraforge", "train", str(ws / "configs" / "mp.yaml")]  # a list: no shell
    metrics = ws / "output" / "mp" / "metrics.jsonl"
    try:
        _wait(lambda: metrics.is_file() and metrics.read_text().count('"loss"') >= 2, what="2 logged steps")
        assert c.post("/api/run/stop", json={"dir": "output/mp"}).status_code == 200
        _wait(lambda: not jobs.running(jobs.job(rec["id"])), 90, "the stop")
        run = c.get("/api/run", params={"dir": "output/mp"}).json()
        log = run["log"]
        assert log.startswith("$ torchrun --standalone --nproc_per_node 2 -m loraforge train ")
        assert "2 processes)" in log and "interrupted: checkpoint written" in log, log[-3000:]
        assert run["status"] == "interrupted" and run["checkpoints"] == 1 and run["processes"] == 2, run
        stopped_at = run["step"]

        r = c.post("/api/run/resume", json={"dir": "output/mp"}).json()
        assert r["processes"] == 2  # the run's last job's count
        argv = jobs.job(r["job"])["argv"]
        assert argv[3:6] == ["--standalone", "--nproc_per_node", "2"] and argv[-2:] == [
            "--set", "resume_from_checkpoint=latest"]
        resumed = jobs.job(r["job"])
        assert jobs.log_tail(resumed).startswith("$ torchrun --standalone --nproc_per_node 2 -m loraforge train ")
        assert stopped_at >= 2  # (the resumed training itself is what tests/test_train_fsdp.py checks)
        jobs.stop(resumed["id"])  # torchrun passes it on to the workers, however far they got
        _wait(lambda: not jobs.running(jobs.job(resumed["id"])), 90, "the second stop")
    finally:
        for j in jobs.jobs():
            if jobs.running(j):
                os.killpg(j["pid"], 9)  # the child leads its own session: torchrun and its workers
