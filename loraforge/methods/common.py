"""Helpers shared by the method modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from loraforge.config import RunConfig, TaskType


def peft_task_type(task_type: TaskType):
    """Our TaskType → peft.TaskType (same names, except PEFT spells QUESTION_ANSWERING `QUESTION_ANS`)."""
    from peft import TaskType as PeftTaskType

    return PeftTaskType["QUESTION_ANS" if task_type.value == "QUESTION_ANSWERING" else task_type.value]


def resolve_targets(cfg: RunConfig, model: nn.Module) -> list[str] | str:
    """cfg.target_modules, or the model family's default when it is left out."""
    if cfg.target_modules is not None:
        from loraforge.models.native import translate_targets

        # A model converted from ChatGLM/Baichuan/Qwen-1 also accepts its original names (query_key_value …).
        return translate_targets(model.config, cfg.target_modules)[0]
    from loraforge.models.discovery import resolve_target_modules

    return resolve_target_modules(model.config, model, None)
