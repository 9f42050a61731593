"""`loraforge train` leaves the optional back ends its run does not use unimported (start-up time, issue 20 point 4):
bitsandbytes unless the method or a quantized base needs it, DeepSpeed unless accelerate launched the run with it."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from loraforge.config import config_from_dict
from loraforge.train.backends import unused_backends
from test_train_helpers import tiny_cli_run


def test_unused_backends_follow_the_method_the_base_and_the_launcher(tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    plain, quantized = tmp_path / "plain", tmp_path / "quantized"
    for d, extra in ((plain, {}), (quantized, {"quantization_config": {"quant_method": "bitsandbytes"}})):
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "llama", **extra}))
    lora = config_from_dict({"metadata_path": "d.jsonl", "method": "lora"})
    qlora = config_from_dict({"metadata_path": "d.jsonl", "method": "qlora"})
    assert unused_backends(lora, plain) == ["bitsandbytes", "deepspeed"]
    assert unused_backends(qlora, plain) == ["deepspeed"]
    assert unused_backends(lora, quantized) == ["deepspeed"]
    assert unused_backends(lora, None) == ["deepspeed"]  # base not found: keep it (preflight reports the base)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert unused_backends(lora, plain) == ["bitsandbytes"]


def test_train_command_runs_a_lora_without_importing_bitsandbytes_or_deepspeed(tmp_path):
    missing = [p for p in ("bitsandbytes", "deepspeed") if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: nothing to leave out")
    cfg = tiny_cli_run(tmp_path, "batch_size: 2\nmax_steps: 1\nplot_loss: false\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_DEEPSPEED", None)
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "loraforge", "train", str(cfg)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "peft" in imported and (tmp_path / "out" / "adapter_model.safetensors").is_file()
    # (an import refused at once still gets a ~0 µs `bitsandbytes` line; a real one loads its submodules)
    assert not [m for m in imported if m.startswith(("bitsandbytes.", "deepspeed."))]
