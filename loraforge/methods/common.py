"""Helpers shared by the method modules."""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from loraforge.config import RunConfig, TaskType

# PeftModel.__init__ (peft 0.21) reads transformers 5's deprecated `is_gradient_checkpointing` alias: a
# FutureWarning from inside the dependencies on every run, about nothing the user can change.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


class _No4bitKernelNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "gemm_4bit_forward" not in record.getMessage()


_NO_4BIT_NOTE = _No4bitKernelNote()


def quiet_unused_bitsandbytes() -> None:
    """Drop bitsandbytes' "Failed to load CPU gemm_4bit_forward" line in a run that has no 4-bit layer.

    PEFT imports bitsandbytes whenever it is installed, to dispatch LoRA layers (peft/tuners/lora/model.py);
    on a CPU with AVX512-BF16 that import logs a missing optional 4-bit kernel, which only QLoRA would use.
    QLoRA imports bitsandbytes itself before this is called, so its runs still show the line."""
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if _NO_4BIT_NOTE not in log.filters:
        log.addFilter(_NO_4BIT_NOTE)


def peft_task_type(task_type: TaskType):
    """Our TaskType → peft.TaskType (same names, except PEFT spells QUESTION_ANSWERING `QUESTION_ANS`)."""
    from peft import TaskType as PeftTaskType

    return PeftTaskType["QUESTION_ANS" if task_type.value == "QUESTION_ANSWERING" else task_type.value]


def resolve_targets(cfg: RunConfig, model: nn.Module) -> list[str] | str:
    """cfg.target_modules as PEFT takes it: left out, every linear layer of the blocks; a preset, its names."""
    from loraforge.models.discovery import is_preset
    from loraforge.models.targets import resolve_target_modules

    if cfg.target_modules is not None and not is_preset(cfg.target_modules):
        from loraforge.models.native import translate_targets

        # A model converted from ChatGLM/Baichuan/Qwen-1 also accepts its original names (query_key_value …).
        return translate_targets(model.config, cfg.target_modules)[0]
    return resolve_target_modules(model.config, model, cfg.target_modules)


def peft_target_modules(model: nn.Module) -> list[str] | str | None:
    """The target_modules of a built PEFT model, in model order (PEFT keeps them as a set); None without any."""
    peft_config = getattr(model, "peft_config", None)
    targets = getattr(peft_config.get("default"), "target_modules", None) if isinstance(peft_config, dict) else None
    if targets is None or isinstance(targets, str):
        return targets
    names = [n for n, _ in model.named_modules()]

    def first(t: str) -> int:
        return next((i for i, n in enumerate(names) if n == t or n.endswith("." + t)), len(names))

    return sorted(targets, key=lambda t: (first(t), t))
