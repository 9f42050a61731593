"""Every YAML shipped under configs/ loads; every text-model config also passes the full preflight (model
config, target modules, method checks, data) from the repository root, as a user would run it."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraforge.config import TaskType, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"article-medical-lora.yaml", "lora-smollm2.yaml", "qlora-smollm2.yaml", "freeze-smollm2.yaml",
            "full-smollm2.yaml", "prefix-smollm2.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_loads_and_validates(path, smollm2_dir, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)  # shipped configs use paths relative to the repository root
    if path.name.startswith("serve-"):
        from loraforge.serve.config import load_server_config

        load_server_config(path)
        return
    cfg = load_config(path)
    if cfg.task_type is TaskType.TEXT_TO_IMAGE:
        return  # image configs name a Stable Diffusion checkpoint the user brings; loading them is the check here
    from loraforge.preflight import run_preflight

    # A previous run of this config on the developer's machine is not a mistake in the shipped file.
    cfg = cfg.model_copy(update={"output_dir": tmp_path / "run"})
    lines: list[str] = []
    report = run_preflight(cfg, echo=lines.append)
    assert report.data_stats is not None and report.data_stats.examples > 0, lines


def test_article_config_keeps_the_article_values():
    cfg = load_config(ROOT / "configs" / "article-medical-lora.yaml")
    assert cfg.task_type is TaskType.CAUSAL_LM and cfg.learning_rate == pytest.approx(1e-4)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.batch_size, cfg.gradient_accumulation_steps, cfg.epochs,
            cfg.save_steps) == (16, 32, 2, 4, 15, 50)


@pytest.mark.slow
def test_article_config_trains_through_the_cli(smollm2_dir, tmp_path):
    """`loraforge train` on the article's YAML as shipped (shortened to 2 steps): a PEFT adapter, a resumable
    checkpoint and the closing lines that say where the adapter is and how to chat with it."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "article"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "loraforge", "train", "configs/article-medical-lora.yaml",
                          "--set", "max_steps=2", "--set", "save_steps=1", "--set", f"output_dir={out}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"Adapter saved in {out}" in res.stdout
    assert f"loraforge chat --base smollm2 --adapter {out}" in res.stdout
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 16 and adapter_cfg["lora_alpha"] == 32
    assert set(adapter_cfg["target_modules"]) == {"q_proj", "v_proj"}
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoint-2" / "trainer_state.json").is_file()
    saved = load_config(out / "config.yaml")
    assert saved.learning_rate == pytest.approx(1e-4) and saved.gradient_accumulation_steps == 4
