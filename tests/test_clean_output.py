"""A normal `train` run prints only loraforge's own lines (issue 14 point 5): no dependency internals — the
transformers weight-loading bar, DeepSpeed's accelerator guess, bitsandbytes' kernel loading in a run without
4-bit layers, FutureWarnings about deprecated transformers APIs — and the data summary once."""

import os
import subprocess
import sys

from test_train_helpers import tiny_cli_run

DEPENDENCY_LINES = ("Loading weights", "Setting accelerator to CPU", "kernels-community", "gemm_4bit",
                    "FutureWarning", "is_gradient_checkpointing", "gradient_checkpointing_enable", "Traceback")


def test_train_output_has_only_loraforge_lines(tmp_path):
    cfg = tiny_cli_run(tmp_path, "task_type: text-generation\nbatch_size: 2\nmax_steps: 2\ngradient_checkpointing: true\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("DS_ACCELERATOR", None)
    proc = subprocess.run([sys.executable, "-m", "loraforge", "train", str(cfg)], capture_output=True, text=True,
                          env=env, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert not [line for line in output.splitlines() if any(d in line for d in DEPENDENCY_LINES)], output
    assert sum(line.startswith("data:") for line in output.splitlines()) == 1, output
