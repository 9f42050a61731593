"""LoRA (Hu et al. 2021, arXiv:2106.09685) through PEFT: frozen base, trainable low-rank updates B·A.

Every `peft.LoraConfig` knob the config exposes is passed through unchanged, so an adapter trained here is
an ordinary PEFT adapter (loadable by PEFT, vLLM, LLaMA-Factory).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loraforge.methods.common import peft_task_type, resolve_targets

if TYPE_CHECKING:
    from torch import nn

    from loraforge.config import RunConfig


def lora_config(cfg: RunConfig, model: nn.Module):
    """The `peft.LoraConfig` this run config asks for (targets resolved against the real model)."""
    from peft import LoraConfig

    init = cfg.init_lora_weights
    return LoraConfig(
        task_type=peft_task_type(cfg.task_type),
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        bias=cfg.lora_bias,
        target_modules=resolve_targets(cfg, model),
        modules_to_save=cfg.modules_to_save,
        init_lora_weights=init,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        layers_to_transform=cfg.layers_to_transform,
    )


def apply(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """Wrap `model` in a trainable PEFT LoRA model (or load `cfg.init_adapter` to continue training it)."""
    from peft import PeftModel, get_peft_model

    if cfg.init_adapter is not None:
        # Continued training: start from the adapter's weights, but a fresh optimizer and schedule.
        return PeftModel.from_pretrained(model, str(cfg.init_adapter), is_trainable=True)
    return get_peft_model(model, lora_config(cfg, model))
