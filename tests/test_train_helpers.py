"""Shared helpers for the training-engine tests (tests/test_train_*.py); this module itself holds no tests.

Runs use a tiny random LLaMA (2 layers, hidden 32, SmolLM2 tokenizer) in fp32 with lora_dropout 0, so two runs
with the same config are bit-identical and any difference a test sees comes from what it changed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

REPO = Path(__file__).resolve().parents[1]

# Answers of very different lengths: a per-micro-batch mean loss would weight these tokens unequally, so only
# token-normalized accumulation makes accumulation N × batch B equal batch N·B.
_ANSWERS = ["Yes.", "No, never.", "Drink water and rest for a few days, then see a doctor if the fever stays high, "
            "if breathing gets hard, or if you feel confused or very weak at any point.",
            "Ok.", "Wash your hands with soap for twenty seconds before eating, after the toilet and after coughing; "
            "dry them on a clean towel and keep nails short so dirt does not collect under them.",
            "Sleep.", "Walk thirty minutes most days.", "It depends on age, weight, medicines you take and other "
            "illnesses, so ask the pharmacist, read the leaflet, and never take more than the daily maximum dose."]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    from loraforge.models.tiny import tiny_model_dir

    return tiny_model_dir("llama", tmp_path_factory.mktemp("tiny"))


def write_rows(path: Path, n: int = 16, *, offset: int = 0, answers: list[str] | None = None) -> Path:
    """n alpaca rows whose answers cycle through very different lengths."""
    answers = answers or _ANSWERS
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            row = {"instruction": f"Question number {i + offset}: what should I do?", "input": "",
                   "output": answers[(i + offset) % len(answers)]}
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("data") / "train.jsonl")


def make_cfg(model_dir: Path, data: Path, out: Path, **overrides: Any):
    """A fast, deterministic run config; `overrides` win."""
    from loraforge.config import config_from_dict

    base = dict(base_model=str(model_dir), metadata_path=str(data), output_dir=str(out), overwrite_output_dir=True,
                precision="fp32", lora_dropout=0.0, learning_rate=1e-2, lr_scheduler="constant", batch_size=2,
                max_steps=4, save_steps=None, logging_steps=1, cutoff_len=128, tokenized_cache=False,
                report_to=["none"], plot_loss=False, seed=0)
    base.update(overrides)
    return config_from_dict(base)


def build(cfg, model_dir: Path):
    """`build_model` for `cfg` on `model_dir`, quietly: (model, loss module, trainable report)."""
    from loraforge.models.loader import load_tokenizer
    from loraforge.train.setup import build_model

    return build_model(cfg, model_dir, load_tokenizer(model_dir), lambda _m: None)


def run(model_dir: Path, data: Path, out: Path, **overrides: Any):
    """Train in this process; returns the TrainResult."""
    from loraforge.train.loop import train

    return train(make_cfg(model_dir, data, out, **overrides), echo=lambda _m: None)


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # the line being written right now
            pass
    return out


def train_losses(run_dir: Path) -> dict[int, float]:
    """Per-step train loss from metrics.jsonl (logging_steps 1)."""
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def val_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in records(run_dir) if "val_loss" in r}


def adapter(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


def max_weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def assert_losses_close(a: dict[int, float], b: dict[int, float], tol: float = 1e-5) -> None:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    diff = max(abs(a[s] - b[s]) for s in a)
    assert diff <= tol, f"max abs loss difference {diff:.3g} > {tol}"


# ---- subprocesses: the real `loraforge train` CLI ----

def cli_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def write_config(cfg, path: Path) -> Path:
    """The fully resolved config, as a run dir's config.yaml holds it (so these runs also check it loads back)."""
    from loraforge.config import save_config

    save_config(cfg, path)
    return path


def start_cli(config: Path, *sets: str, log_dir: Path) -> subprocess.Popen:
    """`python -m loraforge train CONFIG --set ...` in the background; stdout/stderr go to files in log_dir."""
    args = [sys.executable, "-m", "loraforge", "train", str(config)]
    for s in sets:
        args += ["--set", s]
    log_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(args, cwd=REPO, env=cli_env(), stdout=(log_dir / "stdout.txt").open("w"),
                            stderr=(log_dir / "stderr.txt").open("w"))


def wait_for(predicate: Callable[[], bool], proc: subprocess.Popen | None = None, timeout: float = 240.0,
             what: str = "condition") -> None:
    """Poll (a shared, slow machine: no fixed sleeps) until predicate() holds; fail if proc exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before {what}")
        time.sleep(0.05)
    if proc is not None:
        proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


def stop(proc: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 120.0) -> int:
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def tiny_cli_run(tmp_path: Path, keys: str) -> Path:
    """A tiny llama, two rows and a run YAML (`keys`: extra YAML lines) for `python -m loraforge train`."""
    from loraforge.config import TaskType
    from loraforge.models.tiny import tiny_model_dir

    model = tiny_model_dir("llama", tmp_path, TaskType.CAUSAL_LM)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}.", "output": w}) + "\n" for w in ("hi", "yes")))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"base_model: {model}\nmetadata_path: {data}\noutput_dir: {tmp_path / 'out'}\n" + keys)
    return cfg
