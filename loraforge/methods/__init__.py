"""Fine-tuning methods, one module each, dispatched by a plain dict on `cfg.method`.

Each module has `apply(model, cfg) -> model`, which returns the model to train with exactly the intended
parameters trainable (verified afterwards by `report.verify_trainable`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from loraforge.config import RunConfig

# method name → module under loraforge.methods (imported on use: no torch/peft at import time)
METHODS: dict[str, str] = {
    "lora": "lora",
    "qlora": "qlora",
    "prefix": "prefix",
    "ptuning": "ptuning",
    "prompt": "prompt",
    "freeze": "freeze",
    "full": "full",
}

ADAPTER_METHODS = ("lora", "qlora", "prefix", "ptuning", "prompt")


def apply_method(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """Apply `cfg.method` to `model` and return the model to train."""
    module = importlib.import_module(f"loraforge.methods.{METHODS[cfg.method]}")
    return module.apply(model, cfg)


def is_adapter_method(method: str) -> bool:
    """True when the run saves a PEFT adapter (else a complete model)."""
    return method in ADAPTER_METHODS
