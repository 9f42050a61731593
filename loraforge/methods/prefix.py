"""Prefix tuning / P-tuning v2 (Li & Liang 2021, arXiv:2101.00190; Liu et al. 2022, arXiv:2110.07602): trainable
key/value vectors for `num_virtual_tokens` positions are prepended in every attention layer; the model stays
frozen. With `prefix_projection` the prefix is produced by a two-layer MLP (hidden size `encoder_hidden_size`),
the reparameterization both papers use for stable training; without it the key/values are trained directly
(P-tuning v2's default).

Models that implement P-tuning v2 themselves (ChatGLM-style `pre_seq_len` in config.json) use their own
mechanism: the loader sets `pre_seq_len` / `prefix_projection` on the config (`load_kwargs`), the model builds
its `prefix_encoder`, and `apply` freezes everything else.

Measured traps (FINDINGS 6): generation must use the key/value cache (`use_cache=False` crashes); prefix tuning
starts at a much higher loss than LoRA and wants its own learning rate (default 1e-2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loraforge.config.methods import PREFIX
from loraforge.errors import ModelError, Problem
from loraforge.methods.base import Method, ModelShape, ParamEstimate
from loraforge.methods.common import peft_task_type
from loraforge.methods.prompt import (apply_prompt_learning, prompt_learning_problems, verify_prompt_learning,
                                      virtual_token_estimate)

if TYPE_CHECKING:
    from torch import nn

    from loraforge.config import RunConfig

NATIVE_PREFIX_MODULE = "prefix_encoder"


def uses_native_prefix(hf_config: Any) -> bool:
    """True for models whose own code implements P-tuning v2 (a `pre_seq_len` field in config.json)."""
    if isinstance(hf_config, dict):
        return "pre_seq_len" in hf_config
    return hasattr(hf_config, "pre_seq_len")


def load_kwargs(cfg: RunConfig, hf_config: Any = None) -> dict[str, Any]:
    """Config overrides for `load_model` / `from_pretrained` so a native-prefix model builds its prefix encoder;
    {} otherwise. `hf_config` defaults to the config of `cfg.base_model`."""
    if hf_config is None:
        from loraforge.models.discovery import load_hf_config
        from loraforge.models.gguf import resolve_model_path

        hf_config = load_hf_config(resolve_model_path(cfg.base_model), cfg.trust_remote_code)
    if not uses_native_prefix(hf_config):
        return {}
    return {"pre_seq_len": cfg.num_virtual_tokens, "prefix_projection": cfg.prefix_projection}


def check(cfg: RunConfig, hf_config: Any) -> list[Problem]:
    """Preflight problems for prefix tuning (see `prompt.prompt_learning_problems`)."""
    if uses_native_prefix(hf_config):
        return []  # the model's own code decides; PEFT's limits do not apply
    return prompt_learning_problems(cfg, hf_config, task_fit=False)


def prefix_config(cfg: RunConfig, model: nn.Module):
    """The `peft.PrefixTuningConfig`; the MLP hidden size defaults to the model's hidden size."""
    from peft import PrefixTuningConfig

    hidden = cfg.encoder_hidden_size or model.config.get_text_config().hidden_size
    return PrefixTuningConfig(task_type=peft_task_type(cfg.task_type), num_virtual_tokens=cfg.num_virtual_tokens,
                              prefix_projection=cfg.prefix_projection, encoder_hidden_size=hidden,
                              modules_to_save=cfg.modules_to_save)


def apply_native(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """Train only the model's own prefix encoder (ChatGLM-style P-tuning v2).

    Raises:
        ModelError: the model was loaded without `pre_seq_len`, or has no prefix encoder.
    """
    pre_seq_len = getattr(model.config, "pre_seq_len", None)
    names = [n for n, _ in model.named_modules() if n.split(".")[-1] == NATIVE_PREFIX_MODULE]
    if pre_seq_len != cfg.num_virtual_tokens or not names:
        raise ModelError([Problem(
            "num_virtual_tokens", f"the model implements P-tuning v2 itself but was loaded with pre_seq_len="
            f"{pre_seq_len} and {'a' if names else 'no'} `{NATIVE_PREFIX_MODULE}`", value=cfg.num_virtual_tokens,
            fix="load it with `load_model(..., **prefix.load_kwargs(cfg, hf_config))`")])
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(n + ".") for n in names))
    return model


def apply(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """Prefix tuning: PEFT's prefix encoder trains (and a classification head, through `modules_to_save`)."""
    if uses_native_prefix(model.config):
        return apply_native(model, cfg)
    return apply_prompt_learning(model, cfg, prefix_config(cfg, model))


def estimate_params(cfg: RunConfig, shape: ModelShape) -> ParamEstimate:
    """A key and a value vector per layer and virtual token; with `prefix_projection`, the embeddings of the
    hidden size and the MLP (h → enc → layers·2·h) that produces them."""
    h = shape.dims["hidden"]
    out = shape.dims["layers"] * 2 * h
    if cfg.prefix_projection:
        enc = cfg.encoder_hidden_size or h
        return virtual_token_estimate(cfg.num_virtual_tokens * h + h * enc + enc + enc * out + out)
    return virtual_token_estimate(cfg.num_virtual_tokens * out)


METHOD = Method(
    options=PREFIX,
    apply=apply,
    saves_adapter=True,
    estimate_params=estimate_params,
    verify=verify_prompt_learning,
    load_kwargs=load_kwargs,
    check=check,
)
