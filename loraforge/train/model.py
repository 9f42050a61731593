"""The model side of the recipe: base → method → training steps → verified → objective's loss module.

Every method-specific decision is read from the method's record (`loraforge.methods.METHODS`), every
objective-specific one from the objective's (`loraforge.objectives`); nothing here compares `cfg.method` or
`cfg.task_type` with a name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from loraforge.config import RunConfig
from loraforge.errors import ConfigError
from loraforge.train.attention import VARLEN, attention_for, register_varlen_attention
from loraforge.train.precision import autocast_dtype, resolve_precision


def build_model(cfg: RunConfig, model_dir: Path, tokenizer, say: Callable[[str], None], data=None,
                start_from: Callable[[torch.nn.Module], None] | None = None):
    """Load the base, apply the method and its training steps, verify what trains, wrap it in the objective's
    loss module. Returns (model, loss module, trainable report).

    `start_from` loads the weights the run starts from (a full/freeze run continued on other data) before the
    objective sees the model: a preference objective's frozen reference (or precomputed reference log-probs) must
    be the model training starts from, not the base it was built from.

    Raises:
        ConfigError: the built model does not train what the config asks for, or a method's own refusal.
    """
    from loraforge import methods
    from loraforge.methods.report import trainable_report
    from loraforge.objectives import objective_for

    method = methods.method_for(cfg)
    model = load_base(cfg, model_dir, method, data)
    model = methods.apply_method(model, cfg)  # looked up on the module: tests swap in a broken method
    prepare_for_training(model, cfg, method)
    report = trainable_report(model)
    problems = methods.verify_trainable(report, cfg)
    if problems:
        raise ConfigError(problems, title="the built model does not train what the config asks for")
    say(report.table())
    if start_from is not None:
        start_from(model)
    objective = objective_for(cfg)
    loss = objective.loss(model, cfg)
    if data is not None and hasattr(loss, "prepare_data"):  # e.g. precomputed reference log-probs
        loss.prepare_data(data, objective.collate, tokenizer.pad_token_id)
    if cfg.torch_compile:
        compiled = compile_in_place(loss)
        say(f"torch.compile: {type(compiled).__name__} (compiled on its first steps; each new shape recompiles)")
    return model, loss, report


def load_base(cfg: RunConfig, model_dir: Path, method, data=None) -> torch.nn.Module:
    """The base model as the method needs it loaded (QLoRA: quantized; native P-tuning v2: with its prefix
    encoder), with the head a classification run's labels ask for and the attention its batching needs."""
    from loraforge.data.batching import choose_batching
    from loraforge.models.discovery import load_hf_config
    from loraforge.models.loader import load_model

    kwargs: dict[str, Any] = {"dtype": cfg.torch_dtype, "attn_implementation": cfg.attn_implementation,
                              "trust_remote_code": cfg.trust_remote_code}
    # the method's load-time kwargs may also override these (a method that loads frozen weights in bf16)
    kwargs.update(method.load_kwargs(cfg, load_hf_config(model_dir, cfg.trust_remote_code)))
    id2label = getattr(data, "id2label", None)
    if id2label:
        kwargs.update(num_labels=len(id2label), id2label=id2label)
    model = load_model(model_dir, cfg.task_type, **kwargs)
    model.config.use_cache = False  # packed rows need it off (FINDINGS trap 2); training never uses the cache
    if attention_for(cfg.attn_implementation, choose_batching(cfg, model_dir)) == VARLEN:
        # packed rows: attention per example (Σ L² work) instead of one masked T² block over the whole row
        model.set_attn_implementation(register_varlen_attention())
    return model


def prepare_for_training(model: torch.nn.Module, cfg: RunConfig, method) -> None:
    """The method's post-build training steps (LoRA: fused dropout, frozen weights in the autocast dtype), then
    gradient checkpointing when asked for."""
    from loraforge.methods.base import TrainingContext

    precision = resolve_precision(cfg.precision)
    ctx = TrainingContext(precision=precision, compute_dtype=autocast_dtype(precision))
    for step in method.training_steps:
        step(model, cfg, ctx)
    if cfg.gradient_checkpointing:
        # transformers 5 renamed gradient_checkpointing_enable (now a deprecated alias that warns)
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()


def compile_in_place(loss: torch.nn.Module) -> torch.nn.Module:
    """`torch.compile` the module the loss really calls, in place; returns it.

    In place (`Module.compile`), not `torch.compile(model)`: a wrapper would prefix every state-dict key with
    `_orig_mod.`, and the fused LM-head loss never calls the model's own forward: it calls the backbone and
    the head separately, so compiling the whole model would silently compile nothing.
    """
    from loraforge.train.loss import CausalLMLoss

    split = loss.backbone_and_head() if isinstance(loss, CausalLMLoss) else None
    target = split[0] if split is not None else loss.model
    target.compile()
    return target
