"""Tiny random models of each family, saved as real HF model dirs, for tests.

Each dir holds a 2-layer, 4-head model (hidden size 32) with seeded random weights and the SmolLM2 tokenizer,
so it loads, trains and generates through the same code paths as a real checkpoint, in milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loraforge.atomic import atomic_dir
from loraforge.config.schema import TaskType
from loraforge.errors import ModelError, Problem, suggestion

_H, _FF, _LAYERS, _HEADS, _POS = 32, 64, 2, 4, 512

# model_type -> config kwargs (each family spells sizes its own way).
_LLAMA_LIKE = dict(hidden_size=_H, intermediate_size=_FF, num_hidden_layers=_LAYERS, num_attention_heads=_HEADS,
                   num_key_value_heads=2, max_position_embeddings=_POS)
_BERT_LIKE = dict(hidden_size=_H, intermediate_size=_FF, num_hidden_layers=_LAYERS, num_attention_heads=_HEADS,
                  max_position_embeddings=_POS)
_BART_LIKE = dict(d_model=_H, encoder_layers=_LAYERS, decoder_layers=_LAYERS, encoder_attention_heads=_HEADS,
                  decoder_attention_heads=_HEADS, encoder_ffn_dim=_FF, decoder_ffn_dim=_FF, max_position_embeddings=_POS)
_T5_LIKE = dict(d_model=_H, d_ff=_FF, d_kv=_H // _HEADS, num_layers=_LAYERS, num_decoder_layers=_LAYERS,
                num_heads=_HEADS)
_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": dict(_LLAMA_LIKE, head_dim=_H // _HEADS),
    "gemma": dict(_LLAMA_LIKE, head_dim=_H // _HEADS),
    "gemma2": dict(_LLAMA_LIKE, head_dim=_H // _HEADS),
    "phi": dict(_BERT_LIKE),
    "phi3": dict(_LLAMA_LIKE),
    "glm": dict(_LLAMA_LIKE, head_dim=_H // _HEADS),
    "glm4": dict(_LLAMA_LIKE, head_dim=_H // _HEADS),
    "gpt2": dict(n_embd=_H, n_layer=_LAYERS, n_head=_HEADS, n_positions=_POS, n_inner=_FF),
    "gpt_neox": dict(_BERT_LIKE),
    "bloom": dict(hidden_size=_H, n_layer=_LAYERS, n_head=_HEADS),
    "falcon": dict(hidden_size=_H, num_hidden_layers=_LAYERS, num_attention_heads=_HEADS, ffn_hidden_size=_FF),
    "opt": dict(hidden_size=_H, ffn_dim=_FF, num_hidden_layers=_LAYERS, num_attention_heads=_HEADS,
                word_embed_proj_dim=_H, max_position_embeddings=_POS),
    "t5": _T5_LIKE,
    "mt5": _T5_LIKE,
    "bart": _BART_LIKE,
    "mbart": _BART_LIKE,
    "bert": _BERT_LIKE,
    "roberta": dict(_BERT_LIKE, max_position_embeddings=_POS + 2),  # RoBERTa offsets positions by pad_id + 1
    "distilbert": dict(dim=_H, hidden_dim=_FF, n_layers=_LAYERS, n_heads=_HEADS, max_position_embeddings=_POS),
    "deberta-v2": dict(_BERT_LIKE),
}
TINY_FAMILIES: tuple[str, ...] = tuple(_CONFIGS)

# Remote-code families: only a config.json is written (their Python code is not shipped with loraforge, and
# ChatGLM2/3's needs transformers < 4.42), mirroring the published checkpoints' fields.
_REMOTE_CONFIGS: dict[str, dict[str, Any]] = {
    "chatglm": {
        "model_type": "chatglm", "architectures": ["ChatGLMModel"],
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                     "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
                     "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
                     "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification"},
        "num_layers": _LAYERS, "hidden_size": _H, "ffn_hidden_size": _FF, "kv_channels": _H // _HEADS,
        "num_attention_heads": _HEADS, "multi_query_attention": True, "multi_query_group_num": 2,
        "padded_vocab_size": 65024, "seq_length": _POS, "add_qkv_bias": True, "torch_dtype": "float16",
    },
    "baichuan": {
        "model_type": "baichuan", "architectures": ["BaichuanForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                     "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
        "hidden_size": _H, "intermediate_size": _FF, "num_hidden_layers": _LAYERS, "num_attention_heads": _HEADS,
        "vocab_size": 125696, "model_max_length": _POS, "torch_dtype": "bfloat16",
    },
    "qwen": {
        "model_type": "qwen", "architectures": ["QWenLMHeadModel"],
        "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                     "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "hidden_size": _H, "intermediate_size": _FF * 2, "num_hidden_layers": _LAYERS, "num_attention_heads": _HEADS,
        "kv_channels": _H // _HEADS, "vocab_size": 151936, "seq_length": _POS, "torch_dtype": "bfloat16",
    },
}
TINY_REMOTE_FAMILIES: tuple[str, ...] = tuple(_REMOTE_CONFIGS)


def _unknown(family: str, names: tuple[str, ...]) -> ModelError:
    return ModelError([Problem("family", "no tiny model for this family", value=family, allowed=", ".join(names),
                               fix=suggestion(family, names))])


def tiny_config(family: str, vocab_size: int, **overrides: Any) -> Any:
    """The config of a tiny `family` model (hidden 32, 2 layers, 4 heads) with `vocab_size` tokens;
    `overrides` replace any config field (e.g. special token ids).

    Raises:
        ModelError: an unknown family.
    """
    from transformers import AutoConfig

    if family not in _CONFIGS:
        raise _unknown(family, TINY_FAMILIES)
    # Family defaults for special ids (GPT-2's 50256, Phi-3's 32000…) would fall outside a small vocab.
    special = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return AutoConfig.for_model(family, **{**_CONFIGS[family], **special, "vocab_size": vocab_size, **overrides})


def _dir_name(family: str, task_type: TaskType, num_labels: int | None) -> str:
    return f"{family}-{task_type.value.lower()}" + (f"-{num_labels}" if num_labels else "")


def tiny_model_dir(family: str, root: Path, task_type: TaskType = TaskType.CAUSAL_LM,
                   num_labels: int | None = None) -> Path:
    """A saved tiny random `family` model for `task_type` with the SmolLM2 tokenizer, under `root`.

    Deterministic (seeded) and idempotent: a dir built before is reused. Built in a temp dir and renamed into
    place, so a dir that exists is complete.
    """
    import torch
    import transformers

    from loraforge.models.gguf import resolve_model_path
    from loraforge.models.loader import AUTO_CLASSES

    if family not in _CONFIGS:
        raise _unknown(family, TINY_FAMILIES)
    root = Path(root)
    out = root / _dir_name(family, task_type, num_labels)
    if (out / "config.json").is_file():
        return out
    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_model_path("smollm2"))
    # Special ids come from the tokenizer so generation stops and padding works like with the real model.
    special = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                   bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id)
    config = tiny_config(family, len(tokenizer), **special, **({"num_labels": num_labels} if num_labels else {}))
    if getattr(config, "is_encoder_decoder", False):
        config.decoder_start_token_id = tokenizer.pad_token_id  # T5 convention: decoding starts at pad
    auto_cls = getattr(transformers, AUTO_CLASSES[task_type])
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
        torch.manual_seed(0)
        model = auto_cls.from_config(config)
    try:
        with atomic_dir(out, replace=False) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    except OSError:  # FileExistsError too: another process built it first
        if not (out / "config.json").is_file():
            raise
    return out


def tiny_remote_config_dir(family: str, root: Path) -> Path:
    """A dir with only the config.json of a remote-code `family` (chatglm, baichuan, qwen) — no code, no
    weights — to test the registry fallback of target-module checks."""
    if family not in _REMOTE_CONFIGS:
        raise _unknown(family, TINY_REMOTE_FAMILIES)
    out = Path(root) / f"{family}-remote-config"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(_REMOTE_CONFIGS[family], indent=1))
    return out
