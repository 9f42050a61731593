"""AdamW with decoupled weight decay (never on norms/biases) and warmup + decay schedules."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch import nn

    from loraforge.config import RunConfig


def build_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters; 1-D tensors (biases, norm scales) get no weight decay, as is standard
    since BERT: decaying a LayerNorm gain toward 0 only hurts."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # On CPU torch would step each tensor in its own Python loop iteration (no foreach kernels there): a LoRA run
    # has hundreds of small tensors (SmolLM2 all-linear: 420), so the fused CPU kernel updates them all in one
    # call. Only for plain CPU tensors (FSDP2's sharded DTensors keep the default).
    params = decay + no_decay
    fused = bool(params) and all(type(p) is torch.nn.Parameter and p.device.type == "cpu" for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                             **({"fused": True} if fused else {}))


def warmup_steps(cfg: RunConfig, total_steps: int) -> int:
    return cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)


def lr_factor(step: int, *, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine to 0 (Loshchilov & Hutter 2016, no restarts)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig, total_steps: int):
    warm = warmup_steps(cfg, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total=total_steps, warmup=warm, kind=cfg.lr_scheduler))
