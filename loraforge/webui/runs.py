"""Child processes the UI starts — `loraforge train|eval|merge …` — and the runs it lists.

A child is started with an argument list (never a shell), its own session (closing the tab or restarting the UI
does not stop it) and stdout+stderr in a log under `<workspace>/.webui/jobs/`. The job record (argv, pid, exit
code) lets a restarted UI reattach. A run's status comes from its run dir (run.json, checkpoints) and its job:
running, finished, interrupted (stopped with a checkpoint: resumable) or failed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from loraforge.atomic import atomic_write_text
from loraforge.errors import LoraforgeError, Problem
from loraforge.webui import launch
from loraforge.webui.workspace import Workspace

INTERRUPT_CODES = {128 + signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGTERM, -signal.SIGINT}
_PROGRESS = re.compile(r"(\d+)/(\d+) \[([\d:]+)<([\d:?]+)")


class JobError(LoraforgeError):
    title = "cannot start"


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a zombie (exited, not yet reaped by us) is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return True


class JobManager:
    """Starts, stops and describes child processes; one training per output dir."""

    def __init__(self, ws: Workspace, launcher: list[str] | None = None):
        self.ws = ws
        self.launcher = launcher or [sys.executable, "-m", "loraforge"]  # what runs `loraforge <kind> …`
        self.dir = ws.state_dir / "jobs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()

    # --- records ------------------------------------------------------------------------------------

    def _record_path(self, job_id: str) -> Path:
        return self.dir / f"{job_id}.json"

    def _save(self, rec: dict) -> None:
        atomic_write_text(self._record_path(rec["id"]), json.dumps(rec, indent=1))

    def jobs(self) -> list[dict]:
        out = []
        for p in sorted(self.dir.glob("*.json")):
            try:
                out.append(json.loads(p.read_text(encoding="utf-8")))
            except (OSError, json.JSONDecodeError):
                continue
        return sorted(out, key=lambda r: r.get("started", 0))

    def job(self, job_id: str) -> dict:
        if not re.fullmatch(r"[0-9a-f]{12}", job_id or "") or not self._record_path(job_id).is_file():
            raise JobError([Problem("job", "no such job", value=job_id)])
        return json.loads(self._record_path(job_id).read_text(encoding="utf-8"))

    def running(self, rec: dict) -> bool:
        proc = self.procs.get(rec["id"])
        if proc is not None:
            return proc.poll() is None
        return rec.get("exit_code") is None and _alive(rec.get("pid"))

    def log_tail(self, rec: dict, chars: int = 6000) -> str:
        path = Path(rec["log"])
        if not path.is_file():
            return ""
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - chars))
            text = f.read().decode("utf-8", errors="replace")
        # a progress bar rewrites its line with \r: keep the latest state of each line
        return "\n".join(line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r")
                         for line in text.split("\n"))

    # --- start / stop -------------------------------------------------------------------------------

    def start(self, kind: str, args: list[str], *, target: Path, processes: int = 1) -> dict:
        """Run `loraforge <kind> <args…>` in the workspace. `target` is the run dir / report dir it writes;
        `processes` > 1 runs it under torchrun (`launch.py`).

        Raises:
            JobError: a job already writes `target` (one training at a time per output dir).
        """
        target = target.resolve()
        with self.lock:
            for rec in self.jobs():
                if Path(rec["target"]) == target and self.running(rec):
                    raise JobError([Problem("output_dir", f"a {rec['kind']} job is already writing this folder",
                                            value=self.ws.relative(target),
                                            fix="stop it first, or choose another output_dir")])
            job_id = uuid.uuid4().hex[:12]
            log = self.dir / f"{job_id}.log"
            argv = [*(self.launcher if processes <= 1 else launch.launcher(processes)), kind, *args]
            env = {**os.environ, **launch.child_env(processes)}
            with log.open("wb") as out:
                out.write(("$ " + launch.shown_command(kind, args, processes) + "\n").encode())  # shown in the log
                out.flush()
                proc = subprocess.Popen(argv, cwd=self.ws.root, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            rec = {"id": job_id, "kind": kind, "argv": argv, "target": str(target), "pid": proc.pid,
                   "started": time.time(), "log": str(log), "exit_code": None, "processes": processes}
            self._save(rec)
            self.procs[job_id] = proc
        threading.Thread(target=self._reap, args=(rec, proc), daemon=True).start()
        return rec

    def _reap(self, rec: dict, proc: subprocess.Popen) -> None:
        code = proc.wait()
        with self.lock:  # re-read: stop() may have marked the record meanwhile
            rec = {**self.job(rec["id"]), "exit_code": code, "ended": time.time()}
            self._save(rec)

    def stop(self, job_id: str) -> dict:
        """SIGTERM: a training writes a checkpoint at the end of its current step and exits. Under torchrun the
        agent gets it and passes it on to every worker (which all stop at the same step); the agent itself then
        exits 1, so the record says the stop was asked for."""
        with self.lock:
            rec = self.job(job_id)
            if self.running(rec):
                rec = {**rec, "stop_requested": time.time()}
                self._save(rec)
                os.kill(rec["pid"], signal.SIGTERM)
        return rec

    # --- runs ---------------------------------------------------------------------------------------

    def runs(self) -> list[dict]:
        """Every run dir in the workspace (started here or by the CLI), newest first, with its status."""
        by_target: dict[str, dict] = {}
        for rec in self.jobs():
            if rec["kind"] == "train":
                by_target[rec["target"]] = rec  # the latest job per run dir
        dirs = {str(p.resolve()) for p in self.ws.run_dirs()} | set(by_target)
        out = [self.describe(Path(d), by_target.get(d)) for d in dirs]
        return sorted(out, key=lambda r: r["updated"], reverse=True)

    def run_job(self, run_dir: Path) -> dict | None:
        recs = [r for r in self.jobs() if r["kind"] == "train" and Path(r["target"]) == run_dir.resolve()]
        return recs[-1] if recs else None

    def describe(self, run_dir: Path, rec: dict | None = None) -> dict:
        rec = rec if rec is not None else self.run_job(run_dir)
        checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda p: p.stat().st_mtime) if run_dir.is_dir() else []
        running = rec is not None and self.running(rec)
        code = None if rec is None else rec.get("exit_code")
        if running:
            status = "running"
        elif code == 0 or (code is None and (run_dir / "run.json").is_file()):
            status = "finished"
        elif checkpoints and (code in INTERRUPT_CODES or code is None or rec.get("stop_requested")):
            status = "interrupted"
        else:
            status = "failed"
        info: dict[str, Any] = {"dir": self.ws.relative(run_dir), "status": status, "job": rec and rec["id"],
                                "checkpoints": len(checkpoints), "exit_code": code,
                                "processes": (rec or {}).get("processes", 1),
                                "updated": max([p.stat().st_mtime for p in [run_dir, *checkpoints] if p.exists()]
                                               + [rec["started"] if rec else 0])}
        info.update(self._progress(rec) if rec else {})
        last = _last_record(run_dir / "metrics.jsonl")
        if last:
            info.setdefault("step", last.get("step"))
            info["tokens_per_s"] = last.get("tokens_per_s")
            info["loss"] = last.get("loss")
        return info

    def _progress(self, rec: dict) -> dict:
        m = None
        for m in _PROGRESS.finditer(self.log_tail(rec, 3000)):
            pass
        if m is None:
            return {}
        return {"step": int(m.group(1)), "total_steps": int(m.group(2)), "elapsed": m.group(3), "eta": m.group(4)}


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl records (a line cut short by kill -9 is skipped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _last_record(path: Path) -> dict | None:
    records = [r for r in read_metrics(path) if "loss" in r]
    return records[-1] if records else None
