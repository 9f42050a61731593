"""P-tuning (Liu et al. 2021, "GPT Understands, Too", arXiv:2103.10385) through PEFT: `num_virtual_tokens` input
embeddings produced by a small trainable prompt encoder (an MLP, or the paper's bi-LSTM + MLP), prepended to
every sequence; the model itself stays frozen. The encoder reparameterization makes the virtual tokens depend
on each other, which the paper finds more stable to train than free embeddings (prompt tuning).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loraforge.config.methods import PTUNING
from loraforge.methods.base import Method, ModelShape, ParamEstimate
from loraforge.methods.common import peft_task_type
from loraforge.methods.prompt import (apply_prompt_learning, prompt_learning_problems, verify_prompt_learning,
                                      virtual_token_estimate)

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


def estimate_params(cfg: RunConfig, shape: ModelShape) -> ParamEstimate:
    """The virtual-token embeddings plus the prompt encoder: PEFT's MLP (h → enc → enc → h), or a bidirectional
    LSTM in front of it."""
    h = shape.dims["hidden"]
    enc = cfg.encoder_hidden_size or h
    mlp = h * enc + enc + enc * enc + enc + enc * h + h
    lstm = 2 * 4 * (h * h + h * h + 2 * h) + mlp  # bidirectional LSTM + MLP head
    encoder = lstm if cfg.encoder_reparameterization_type == "LSTM" else mlp
    return virtual_token_estimate(cfg.num_virtual_tokens * h + encoder)


METHOD = Method(
    options=PTUNING,
    apply=apply,
    saves_adapter=True,
    estimate_params=estimate_params,
    verify=verify_prompt_learning,
    check=check,
)
