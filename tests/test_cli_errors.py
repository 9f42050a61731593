"""User mistakes through the real console entry (`python -m loraforge`): exit code 2, every problem listed, no
traceback. A config-only mistake is reported before torch is even imported, so no weights can have been read."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BAD = Path(__file__).parent / "bad"


def cli(*args: str, cwd: Path | None = None, importtime: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run([sys.executable, *flags, "-m", "loraforge", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def test_config_mistakes_all_at_once_exit_2_without_torch(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("metadata_path: data.jsonl\nlerning_rate: 1e-4\nlora_rank: 0\nlora_dropout: 1.5\n"
                   "lr_scheduler: cosin\nmethod: full\nlora_alpha: 32\n")
    res = cli("validate", str(cfg), importtime=True)
    err = res.stderr
    assert res.returncode == 2 and "Traceback" not in err
    for part in ("invalid config (7 problems)", "lerning_rate: unknown key", "did you mean `learning_rate`?",
                 "lora_rank: must be greater than 0 (got 0)", "lora_dropout: must be less than 1 (got 1.5)",
                 "allowed: >= 0 and < 1", "did you mean `cosine`?", "lora_alpha: only applies to method lora / qlora"):
        assert part in err, part
    imported = {line.rsplit("|", 1)[-1].strip() for line in err.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "transformers" not in imported  # no model code ran, no weights read


def test_override_mistake_and_missing_file(tmp_path):
    cfg = tmp_path / "ok.yaml"
    cfg.write_text("metadata_path: data.jsonl\n")
    res = cli("validate", str(cfg), "--set", "lora_rank=-4", "--set", "batch_size=two")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "lora_rank: must be greater than 0 (got -4)" in res.stderr and "batch_size: must be an integer" in res.stderr
    res = cli("validate", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2 and "config file not found" in res.stderr and "Traceback" not in res.stderr


def test_model_and_data_mistakes_exit_2(tmp_path):
    """The article's seed YAML, run where its model and data do not exist: both reported, exit 2."""
    res = cli("validate", str(BAD / "configs" / "article_seed.yaml"), cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "./models/chatglm3-6b" in res.stderr and "training data file not found" in res.stderr


def test_task_type_mistake_through_train_exits_2_before_training(tmp_path):
    from loraforge.models.tiny import tiny_model_dir

    model = tmp_path / "llama"
    shutil.copytree(tiny_model_dir("llama", tmp_path / "tiny"), model,
                    ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = tmp_path / "s2s.yaml"
    cfg.write_text(f"base_model: {model}\nmetadata_path: {BAD / 'data' / 'good.jsonl'}\ntask_type: SEQ_2_SEQ_LM\n"
                   f"output_dir: {tmp_path / 'run'}\n")
    res = cli("train", str(cfg))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "set `task_type: CAUSAL_LM`" in res.stderr and "decoder_input_ids" not in res.stderr
    assert not (tmp_path / "run").exists()  # refused before the run dir was even created


@pytest.mark.parametrize("args", [["validate"], ["validate", "a.yaml", "--sett", "x=1"]])
def test_usage_errors_exit_2(args):
    res = cli(*args)
    assert res.returncode == 2 and "Traceback" not in res.stderr


def test_estimate_command(tmp_path):
    from loraforge.models.tiny import tiny_model_dir

    model = tiny_model_dir("llama", tmp_path / "tiny")
    cfg = tmp_path / "e.yaml"
    cfg.write_text(f"base_model: {model}\nmetadata_path: {BAD / 'data' / 'good.jsonl'}\ncutoff_len: 64\n")
    res = cli("estimate", str(cfg))
    assert res.returncode == 0, res.stderr
    assert "trainable params:" in res.stdout and "estimated peak process RSS" in res.stdout
    adapted = res.stdout.split("adapted modules:")[1].splitlines()[0]
    assert sorted(m.strip() for m in adapted.split(",")) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # every block linear
