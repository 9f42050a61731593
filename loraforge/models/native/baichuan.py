"""Baichuan2-7B and Baichuan-7B → transformers' `LlamaForCausalLM`.

* `W_pack` = [q; k; v] rows (no bias); the rest already has LLaMA's names;
* Baichuan2's `NormHead`: the checkpoint stores the LM head raw and the model uses `normalize(weight)` (row-wise
  L2); the converted head stores the normalized rows, in float32 (rounding them back to bf16 would move logits by
  more than 1e-4). Baichuan-7B (v1, `BaiChuanForCausalLM`, 64,000 tokens) has a plain head.
* Tokenizer: SentencePiece BPE without dummy prefix; `<s>`, `</s>`, `<unk>` typed in text are control tokens and
  `<reserved_N>` are user-defined symbols (so the chat roles 195/196 are `<reserved_106>` / `<reserved_107>`).

Baichuan-13B / Baichuan2-13B use ALiBi instead of RoPE: no native equivalent, refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from loraforge.models.native.base import ModuleMap, NativeFamily
from loraforge.models.native.tokenizers import save_fast_tokenizer, sentencepiece_bpe

L = "model.layers.{i}"
MODULES = (
    ModuleMap("model.embed_tokens", "model.embed_tokens"),
    ModuleMap(f"{L}.input_layernorm", f"{L}.input_layernorm"),
    ModuleMap(f"{L}.self_attn.q_proj", f"{L}.self_attn.W_pack", 0, 3),
    ModuleMap(f"{L}.self_attn.k_proj", f"{L}.self_attn.W_pack", 1, 3),
    ModuleMap(f"{L}.self_attn.v_proj", f"{L}.self_attn.W_pack", 2, 3),
    ModuleMap(f"{L}.self_attn.o_proj", f"{L}.self_attn.o_proj"),
    ModuleMap(f"{L}.post_attention_layernorm", f"{L}.post_attention_layernorm"),
    ModuleMap(f"{L}.mlp.gate_proj", f"{L}.mlp.gate_proj"),
    ModuleMap(f"{L}.mlp.up_proj", f"{L}.mlp.up_proj"),
    ModuleMap(f"{L}.mlp.down_proj", f"{L}.mlp.down_proj"),
    ModuleMap("model.norm", "model.norm"),
    ModuleMap("lm_head", "lm_head"),
)


def claims(raw: dict) -> bool:
    return raw.get("model_type") == "baichuan" or any(a.lower() == "baichuanforcausallm"
                                                       for a in raw.get("architectures") or [])


def _uses_alibi(raw: dict, src: Path) -> bool:
    code = src / "modeling_baichuan.py"
    if code.is_file():
        text = code.read_text(errors="replace")
        return "alibi" in text.lower() and "RotaryEmbedding" not in text
    # The 13B configs have no max_position_embeddings (ALiBi has no position table) and 40 layers of 5120.
    return "max_position_embeddings" not in raw or (raw.get("hidden_size") == 5120 and raw.get("num_hidden_layers") == 40)


def refusal(raw: dict, src: Path) -> str | None:
    if _uses_alibi(raw, src):
        return ("Baichuan-13B / Baichuan2-13B use ALiBi attention biases instead of rotary positions; no native "
                "transformers architecture computes them (Baichuan2-7B and Baichuan-7B convert)")
    if raw.get("hidden_act", "silu") != "silu":
        return f"config.json `hidden_act: {raw['hidden_act']}` (Baichuan-7B/Baichuan2-7B use silu)"
    return None


def is_v2(raw: dict) -> bool:
    """Baichuan2 (NormHead): `BaichuanForCausalLM`; Baichuan-7B v1 spells it `BaiChuanForCausalLM` (64k vocab)."""
    archs = raw.get("architectures") or []
    return "BaiChuanForCausalLM" not in archs and raw.get("vocab_size") != 64000


def variant(raw: dict, src: Path) -> str:
    return "baichuan2-7b" if is_v2(raw) else "baichuan-7b"


def native_config(raw: dict, src: Path) -> dict:
    heads = raw["num_attention_heads"]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": raw["vocab_size"], "hidden_size": raw["hidden_size"],
        "intermediate_size": raw["intermediate_size"], "num_hidden_layers": raw["num_hidden_layers"],
        "num_attention_heads": heads, "num_key_value_heads": heads, "head_dim": raw["hidden_size"] // heads,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "max_position_embeddings": raw.get("max_position_embeddings") or raw.get("model_max_length", 4096),
        "rms_norm_eps": raw.get("rms_norm_eps", 1e-6),
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "initializer_range": raw.get("initializer_range", 0.02), "tie_word_embeddings": False, "use_cache": True,
        "bos_token_id": raw.get("bos_token_id", 1), "eos_token_id": raw.get("eos_token_id", 2),
        "pad_token_id": raw.get("pad_token_id", 0), "pretraining_tp": 1, "dtype": raw.get("torch_dtype", "bfloat16"),
    }


def part_sizes(native: dict) -> list[int]:
    return [native["hidden_size"]] * 3


def transform(name: str, tensor, raw: dict):
    if name == "lm_head.weight" and is_v2(raw):
        import torch

        return torch.nn.functional.normalize(tensor.float(), dim=-1)
    return tensor


def _gen(src: Path) -> dict:
    path = src / "generation_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _template(user: str, assistant: str) -> str:
    # generation_utils.build_chat_input: system text, then user_token + text / assistant_token + text, and the
    # assistant token when the conversation does not end with the assistant. No BOS, no EOS between turns.
    return ("{%- for m in messages -%}"
            "{%- if m['role'] == 'system' -%}"
            "{%- if not loop.first -%}{{- raise_exception('Baichuan2: a system message must come first') -}}"
            "{%- endif -%}{{- m['content'] -}}"
            "{%- elif m['role'] == 'user' -%}{{- " + repr(user) + " + m['content'] -}}"
            "{%- elif m['role'] == 'assistant' -%}{{- " + repr(assistant) + " + m['content'] -}}"
            "{%- else -%}{{- raise_exception('Baichuan2 roles are system, user, assistant; got ' + m['role']) -}}"
            "{%- endif -%}{%- endfor -%}"
            "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}{{- " + repr(assistant)
            + " -}}{%- endif -%}")


def tokenizer(src: Path, out: Path, raw: dict, native: dict) -> None:
    sp = sentencepiece_bpe(src / "tokenizer.model", controls_parse_in_text=True)
    gen = _gen(src)
    user, assistant = sp.pieces[gen.get("user_token_id", 195)], sp.pieces[gen.get("assistant_token_id", 196)]
    cfg = json.loads((src / "tokenizer_config.json").read_text()) if (src / "tokenizer_config.json").is_file() else {}
    save_fast_tokenizer(sp.tokenizer, out, chat_template=_template(user, assistant), padding_side="left",
                        model_max_length=cfg.get("model_max_length", raw.get("model_max_length", 4096)),
                        special={"bos_token": sp.pieces[raw.get("bos_token_id", 1)],
                                 "eos_token": sp.pieces[raw.get("eos_token_id", 2)], "unk_token": sp.unk,
                                 "pad_token": sp.pieces[raw.get("pad_token_id", 0)]},
                        post_prefix=[(sp.pieces[raw.get("bos_token_id", 1)], raw.get("bos_token_id", 1))]
                        if cfg.get("add_bos_token") else None)


def generation_config(raw: dict, src: Path, native: dict) -> dict:
    gen = _gen(src)
    keep = {k: gen[k] for k in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty",
                                "do_sample") if k in gen}
    return {**keep, "bos_token_id": native["bos_token_id"], "eos_token_id": native["eos_token_id"],
            "pad_token_id": native["pad_token_id"]}


def not_exportable(raw: dict) -> tuple[str, ...]:
    # The original NormHead normalizes whatever lm_head holds: a LoRA on the normalized head cannot be written as
    # one on the raw head.
    return ("lm_head",) if is_v2(raw) else ()


def notes(raw: dict) -> list[str]:
    return (["NormHead: lm_head stores normalize(weight) (float32)"] if is_v2(raw) else []) + \
        ["history truncation to model_max_length - max_new_tokens (the original chat()) is not in the template"]


FAMILY = NativeFamily(
    name="baichuan", native_architecture="LlamaForCausalLM", claims=claims, refusal=refusal, variant=variant,
    native_config=native_config, tokenizer=tokenizer, generation_config=generation_config, modules=MODULES,
    part_sizes=part_sizes, skip=(r"rotary_emb\.inv_freq$",), transform=transform, not_exportable=not_exportable,
    notes=notes)
