"""P-tuning (Liu et al. 2021, "GPT Understands, Too", arXiv:2103.10385) through PEFT: `num_virtual_tokens` input
embeddings produced by a small trainable prompt encoder (an MLP, or the paper's bi-LSTM + MLP), prepended to
every sequence; the model itself stays frozen. The encoder reparameterization makes the virtual tokens depend
on each other, which the paper finds more stable to train than free embeddings (prompt tuning).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loraforge.methods.common import peft_task_type
from loraforge.methods.prompt import apply_prompt_learning, prompt_learning_problems

if TYPE_CHECKING:
    from torch import nn

    from loraforge.config import RunConfig
    from loraforge.errors import Problem


def check(cfg: RunConfig, hf_config: Any) -> list[Problem]:
    """Preflight problems for P-tuning (see `prompt.prompt_learning_problems`)."""
    return prompt_learning_problems(cfg, hf_config, task_fit=False)


def ptuning_config(cfg: RunConfig, model: nn.Module):
    """The `peft.PromptEncoderConfig`: encoder type MLP or LSTM; its hidden size defaults to the model's."""
    from peft import PromptEncoderConfig

    hidden = cfg.encoder_hidden_size or model.config.get_text_config().hidden_size
    return PromptEncoderConfig(task_type=peft_task_type(cfg.task_type), num_virtual_tokens=cfg.num_virtual_tokens,
                               encoder_reparameterization_type=cfg.encoder_reparameterization_type,
                               encoder_hidden_size=hidden, modules_to_save=cfg.modules_to_save)


def apply(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """P-tuning: the prompt encoder trains (and a classification head, through `modules_to_save`)."""
    return apply_prompt_learning(model, cfg, ptuning_config(cfg, model))
