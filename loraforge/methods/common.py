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
    """cfg.target_modules as PEFT takes it: left out, every linear layer of the blocks; a preset, its names."""
    from loraforge.models.discovery import resolve_target_modules
    from loraforge.models.targets import is_preset

    if cfg.target_modules is not None and not is_preset(cfg.target_modules):
        return cfg.target_modules
    return resolve_target_modules(model.config, model, cfg.target_modules)
