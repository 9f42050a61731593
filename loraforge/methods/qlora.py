"""QLoRA (Dettmers et al. 2023, arXiv:2305.14314): a frozen 4-bit (NF4/FP4) or 8-bit (LLM.int8, arXiv:2208.07339)
base loaded through bitsandbytes, with trainable LoRA weights on top.

The loader quantizes while loading (`load_kwargs(cfg)` gives it the `BitsAndBytesConfig`); `apply` then
prepares the quantized model for training and adds LoRA exactly as `methods/lora.py` does.

CPU trap (FINDINGS trap 1, measured with bitsandbytes 0.50.2): on a CPU with AVX512-BF16, the first forward of a
`Linear4bit` in eval mode without gradients (an evaluation pass) repacks its weight into an inference-only
layout; every later forward then goes through a kernel without a backward, and LoRA gradients are silently wrong
(relative error ≈ 1.6). `apply` turns that repacking off on every 4-bit layer before any forward runs.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from loraforge.config.methods import QLORA
from loraforge.errors import ModelError, Problem
from loraforge.methods.base import Method, ModelShape, ParamEstimate
from loraforge.methods.lora import estimate_params as lora_estimate_params
from loraforge.methods.lora import lora_config
from loraforge.methods.lora import verify as verify_lora

if TYPE_CHECKING:
    from torch import nn

    from loraforge.config import RunConfig


# Names of task heads across transformers' models (LLaMA/GPT `score`, BERT `classifier`, QA `qa_outputs`).
TASK_HEADS = ("lm_head", "score", "classifier", "qa_outputs")


def quantization_config(cfg: RunConfig):
    """The `transformers.BitsAndBytesConfig` for `cfg.quant_bits` (4: NF4/FP4 + double quant + compute dtype; 8)."""
    import torch
    from transformers import BitsAndBytesConfig

    skip: dict = {}
    if cfg.task_type.value not in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):
        # A new task head is trained in full (PEFT modules_to_save): it must stay in full precision — a 4-bit
        # `score` of a token classifier cannot require gradients. The list replaces transformers' default
        # (the LM head), so that stays in it.
        skip = {"llm_int8_skip_modules": list(TASK_HEADS)}
    if cfg.quant_bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, **skip)
    return BitsAndBytesConfig(
        **skip,
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=getattr(torch, cfg.bnb_4bit_compute_dtype),
    )


def load_kwargs(cfg: RunConfig, hf_config: Any = None) -> dict[str, Any]:
    """Extra keyword arguments for `loraforge.models.loader.load_model` when the method is qlora.

    On CUDA the whole model is placed on the current GPU while loading (bitsandbytes quantizes on the way in);
    on CPU no device map is needed. `hf_config` is unused (the same signature as `prefix.load_kwargs`).
    """
    import torch

    kwargs: dict[str, Any] = {"quantization_config": quantization_config(cfg)}
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    return kwargs


def check(cfg: RunConfig, hf_config: Any) -> list[Problem]:
    """Preflight problems for a QLoRA run: bitsandbytes missing, or a base model that is already quantized."""
    problems: list[Problem] = []
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        problems.append(Problem("method", "qlora needs the bitsandbytes package", value="qlora",
                                fix="pip install bitsandbytes, or use `method: lora`"))
    existing = getattr(hf_config, "quantization_config", None)
    if existing:
        kind = existing.get("quant_method") if isinstance(existing, dict) else getattr(existing, "quant_method", existing)
        problems.append(Problem("base_model", f"the base model is already quantized ({kind}); qlora would quantize it again",
                                value=cfg.base_model, fix="use `method: lora` on this model, or a full-precision base"))
    return problems


def disable_cpu_inference_repack(model: nn.Module) -> int:
    """Keep every bitsandbytes 4-bit layer in its trainable weight layout (FINDINGS trap 1).

    Sets `support_avx512bf16_for_cpu = False` (the switch bitsandbytes 0.50 checks before repacking a weight for
    CPU inference) and undoes a repack that already happened. Returns the number of 4-bit layers seen.
    """
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        count += 1
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            # A forward already ran in eval mode: restore the layout the training kernels expect.
            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state)
    return count


def is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def apply(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """Prepare a bitsandbytes-quantized model for training and add LoRA.

    Raises:
        ModelError: the model was not loaded quantized (the loader did not get `load_kwargs(cfg)`).
    """
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    if not is_quantized(model):
        raise ModelError([Problem("method", "qlora needs a base model loaded in 4/8-bit, but this one is not quantized",
                                  value="qlora", fix="load it with `load_model(..., **qlora.load_kwargs(cfg))`")])
    disable_cpu_inference_repack(model)
    # Gradient checkpointing is the loop's choice (cfg.gradient_checkpointing); PEFT would turn it on by default,
    # which costs ~30% speed on CPU where memory is rarely the limit.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.init_adapter is not None:
        return PeftModel.from_pretrained(model, str(cfg.init_adapter), is_trainable=True)
    return get_peft_model(model, lora_config(cfg, model))


def estimate_params(cfg: RunConfig, shape: ModelShape) -> ParamEstimate:
    """LoRA's parameters on a base whose block linears are stored in 4 or 8 bits (bitsandbytes keeps the head)."""
    quantized = sum(l["numel"] for l in shape.linears if l["group"] != "head")
    if cfg.quant_bits == 8:
        per = 1 + 4 / 4096  # int8 weight + one fp32 scale per row (rows are ~4096 wide)
    else:
        # NF4: 4 bits + an absmax per 64-value block (fp32, or 8-bit + a second-level fp32 per 256 blocks).
        per = 0.5 + (1 / 64 + 4 / (64 * 256) if cfg.bnb_4bit_use_double_quant else 4 / 64)
    total = sum(shape.params.values()) * shape.weight_bytes
    weights = int(total - quantized * shape.weight_bytes + quantized * per)
    # LoRA's `cast_frozen` is not one of QLoRA's training steps: its quantized linears are dequantized per use
    return replace(lora_estimate_params(cfg, shape), weights_bytes=weights, frozen_linears_in_compute_dtype=False,
                   lean_blocks=False)  # its 4-bit layers keep PEFT's path (no fused training steps)


METHOD = Method(
    options=QLORA,
    apply=apply,
    saves_adapter=True,
    estimate_params=estimate_params,
    verify=verify_lora,
    load_kwargs=load_kwargs,
    check=check,
    uses_target_modules=True,
    quantizes_base=True,
)
