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
