"""LoRA (Hu et al. 2021, arXiv:2106.09685) through PEFT: frozen base, trainable low-rank updates B·A.

Every `peft.LoraConfig` knob the config exposes is passed through unchanged, so an adapter trained here is
an ordinary PEFT adapter (loadable by PEFT, vLLM, LLaMA-Factory). Training-only speed-ups that keep that format
(fused dropout, fused LoRA linear, frozen weights in the autocast dtype, no fp32 round trip of inputs) are the
record's `training_steps`, in `lora_training.py`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from loraforge.config.methods import LORA
from loraforge.errors import Problem
from loraforge.methods.base import Method, ModelShape, ParamEstimate
from loraforge.methods.common import peft_task_type, quiet_unused_bitsandbytes, resolve_targets
from loraforge.methods.lora_training import LORA_TRAINING_STEPS

if TYPE_CHECKING:
    from torch import nn

    from loraforge.config import RunConfig
    from loraforge.methods.report import TrainableReport


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

    quiet_unused_bitsandbytes()
    if cfg.init_adapter is not None:
        # Continued training: start from the adapter's weights, but a fresh optimizer and schedule.
        return PeftModel.from_pretrained(model, str(cfg.init_adapter), is_trainable=True)
    return get_peft_model(model, lora_config(cfg, model))


def load_kwargs(cfg: RunConfig, hf_config: Any = None) -> dict[str, Any]:
    """Under bf16/fp16 training, a 16-bit checkpoint's frozen base loads straight in the compute dtype: no fp32
    copy of a frozen weight is ever made (on a CPU, `torch_dtype: auto` would otherwise widen it to float32).

    The training step `lora_training.fp32_where_it_matters` then puts back in fp32 what precision needs: the
    embeddings (they start the fp32 residual stream), the norms and every trainable parameter. Not for DoRA (its
    magnitude math reads the base weight in fp32), nor when `torch_dtype` is set explicitly.
    """
    from loraforge.train.precision import resolve_precision

    if cfg.use_dora or cfg.torch_dtype != "auto":
        return {}
    # A checkpoint stored in fp32 (the embedded SmolLM2, imported from GGUF) is memory-mapped without a copy when
    # loaded in fp32, and `cast_frozen` then replaces each frozen weight; converting while loading would hold the
    # mapped fp32 file and the 16-bit copies at once (measured: +120 MiB peak for SmolLM2). 16-bit checkpoints,
    # nearly every published one, load straight in the compute dtype instead of being widened to fp32.
    stored = str(getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)).replace("torch.", "")
    if stored not in ("bfloat16", "float16"):
        return {}
    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(resolve_precision(cfg.precision))
    return {"dtype": dtype} if dtype else {}


def verify(report: TrainableReport, cfg: RunConfig) -> list[Problem]:
    """LoRA weights exist for every listed target, and no base weight trains (except biases when asked).

    PEFT silently drops list entries that match nothing when another entry matches (FINDINGS trap 3), so each
    entry is checked on the built model.
    """
    problems: list[Problem] = []
    kinds = report.trained_kinds
    if "lora" not in kinds:
        problems.append(Problem("target_modules", "no LoRA weights were created", value=cfg.target_modules,
                                fix="use names from `loraforge inspect MODEL`"))
    elif isinstance(cfg.target_modules, list):
        from loraforge.models.native import native_names_for_base

        for i, entry in enumerate(cfg.target_modules):
            # an original ChatGLM/Baichuan/Qwen-1 name was translated for the converted model (query_key_value …)
            names = {entry} | native_names_for_base(cfg.base_model, entry)
            if not any(f"{n}.lora_" in t for n in names for t in report.trainable_names):
                problems.append(Problem(f"target_modules[{i}]", "no LoRA weights were created for this entry",
                                        value=entry, fix="use names from `loraforge inspect MODEL`"))
    allowed = {"lora", "saved_module"}
    if cfg.lora_bias != "none":
        allowed |= {"bias", "attention", "mlp", "norm", "other", "embeddings", "lm_head", "head"}
    stray = sorted(set(kinds) - allowed)
    if stray:
        problems.append(Problem("method", f"base weights are trainable in a LoRA run: {', '.join(stray)}",
                                value=cfg.method, fix="this is a bug in the method setup; please report it"))
    return problems


def adapted_linears(cfg: RunConfig, shape: ModelShape) -> list[dict[str, Any]]:
    """The linear layers LoRA will wrap, matched the way PEFT matches `target_modules`."""
    from loraforge.models.targets import resolve_target_modules

    linears = shape.linears
    targets = resolve_target_modules(shape.hf_config, shape.model, cfg.target_modules)
    if isinstance(targets, str) and targets.lower() == "all-linear":
        hits = [l for l in linears if l["group"] != "head"]  # PEFT's all-linear skips the output layer
    elif isinstance(targets, str):
        rx = re.compile(targets)
        hits = [l for l in linears if rx.fullmatch(l["name"])]
    else:
        hits = [l for l in linears if any(l["name"] == t or l["name"].endswith("." + t) for t in targets)]
    layers = cfg.layers_to_transform
    if layers is not None:
        wanted = {layers} if isinstance(layers, int) else set(layers)
        hits = [l for l in hits if l["layer"] in wanted]
    return [dict(l) for l in hits]


def estimate_params(cfg: RunConfig, shape: ModelShape) -> ParamEstimate:
    """r·(in + out) per adapted linear (+ out for DoRA's magnitude), trained biases, `modules_to_save` copies."""
    adapted = adapted_linears(cfg, shape)
    r = cfg.lora_rank
    extra = sum(r * (l["in"] + l["out"]) + (l["out"] if cfg.use_dora else 0) for l in adapted)
    params = shape.params
    base: set[str] = set()
    if cfg.lora_bias == "all":
        base |= {n for n in params if n.endswith(".bias")}
    elif cfg.lora_bias == "lora_only":
        base |= {l["name"] + ".bias" for l in adapted if l["name"] + ".bias" in params}
    for target in cfg.modules_to_save or []:
        # PEFT trains a copy; the copy is new parameters, the original stays frozen.
        extra += sum(numel for n, numel in params.items() if n.rsplit(".", 1)[0].endswith(target)
                     or f".{target}." in f".{n}")
    from loraforge.train.precision import resolve_precision

    weights, in_compute_dtype = None, False
    if not cfg.use_dora and (shape.weight_bytes == 2 or resolve_precision(cfg.precision) in ("bf16", "fp16")):
        # frozen linears and embeddings 16-bit (a 16-bit base loads so; an fp32 one is cast by `cast_frozen`, its
        # mapped file released), norms fp32 (fp32_where_it_matters); a tied head is the embedding's table
        tied = "head" if getattr(shape.hf_config, "tie_word_embeddings", False) else None
        linear = sum(l["numel"] for l in shape.linears if l["group"] != tied)
        from torch.nn import Embedding

        linear += sum(m.weight.numel() for m in shape.model.modules() if isinstance(m, Embedding))
        weights, in_compute_dtype = linear * 2 + (sum(params.values()) - linear) * 4, True
    from loraforge.methods.lora_blocks import FUSED_BLOCK_TYPES

    lean = (not cfg.use_dora and cfg.fused_lora_linear and cfg.fused_decoder_blocks
            and getattr(shape.hf_config, "model_type", "") in FUSED_BLOCK_TYPES)
    return ParamEstimate(trainable_base=frozenset(base), new_params=extra, adapted=tuple(adapted),
                         weights_bytes=weights, frozen_linears_in_compute_dtype=in_compute_dtype, lean_blocks=lean)


METHOD = Method(
    options=LORA,
    apply=apply,
    saves_adapter=True,
    estimate_params=estimate_params,
    verify=verify,
    load_kwargs=load_kwargs,
    training_steps=LORA_TRAINING_STEPS,
    uses_target_modules=True,
)
