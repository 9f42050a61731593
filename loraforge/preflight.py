"""Checks that need the model's config (not its weights) and the data, run before any training.

`loraforge validate` runs exactly this; `loraforge train` runs it first. Every problem — config, data, task type
vs architecture, target modules vs the real module names — is collected and reported together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from loraforge.config import RunConfig
from loraforge.errors import LoraforgeError, Problem


class PreflightError(LoraforgeError):
    title = "preflight found problems (nothing was trained)"


@dataclass
class PreflightReport:
    model_dir: Path
    model_type: str
    kind: str
    target_modules: list[str] | str | None = None
    notes: list[str] = field(default_factory=list)


def run_preflight(cfg: RunConfig, echo: Callable[[str], None] = print) -> PreflightReport:
    """Raise PreflightError listing every problem found; otherwise print a short summary and return it."""
    from loraforge.data.formats import load_conversations, resolve_train_files
    from loraforge.models.discovery import check_target_modules, load_hf_config, meta_model, resolve_target_modules
    from loraforge.models.gguf import resolve_model_path
    from loraforge.models.registry import check_task_type, model_kind

    problems: list[Problem] = []
    model_dir = resolve_model_path(cfg.base_model)  # raises ModelError on its own: nothing else can be checked
    hf_config = load_hf_config(model_dir, cfg.trust_remote_code)
    report = PreflightReport(model_dir, getattr(hf_config, "model_type", "?"), model_kind(hf_config))
    task_problems = check_task_type(hf_config, cfg.task_type)
    problems += task_problems
    if cfg.method in ("lora", "qlora") and not task_problems and cfg.init_adapter is None:
        meta = meta_model(hf_config, cfg.task_type, trust_remote_code=cfg.trust_remote_code)
        target_problems = check_target_modules(hf_config, meta, cfg.target_modules)
        problems += target_problems
        if not target_problems:
            report.target_modules = resolve_target_modules(hf_config, meta, cfg.target_modules)
    try:
        files = resolve_train_files(cfg)
        load_conversations(files, cfg.system_prompt)
        if cfg.val_file is not None:
            load_conversations([Path(cfg.val_file)], cfg.system_prompt)
    except LoraforgeError as e:
        problems += e.problems
    if problems:
        raise PreflightError(problems)
    echo(f"preflight OK: {report.model_type} ({report.kind}), task {cfg.task_type.value}, method {cfg.method}"
         + (f", target_modules {report.target_modules}" if report.target_modules else ""))
    return report
