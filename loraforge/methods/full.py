"""Full fine-tuning: every parameter trains. The run dir is a complete HF model (plus tokenizer)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from loraforge.config import RunConfig


def apply(model: nn.Module, cfg: RunConfig) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model
