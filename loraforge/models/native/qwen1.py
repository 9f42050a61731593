"""Qwen-1 (Qwen-7B, Qwen-7B-Chat, Qwen-14B …, model_type `qwen`) → transformers' `Qwen2ForCausalLM`.

* `c_attn` = [q; k; v] rows with bias; `c_proj(w1(x) * silu(w2(x)))`: `w2` is the gate and `w1` the up
  projection; config `intermediate_size` is twice the real MLP width;
* RoPE over the whole head (`rotary_pct` 1), base `rotary_emb_base`, RMSNorm `layer_norm_epsilon`;
* dynamic NTK and logn attention act only beyond `seq_length` (and never in training): native Qwen2 has neither,
  so the conversion is exact up to `seq_length` and `cutoff_len` beyond it is refused by preflight;
* Tokenizer: `qwen.tiktoken` → byte-level BPE; special tokens `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`,
  `<|extra_0..204|>` after the ranks, parsed in text as `tokenizer.encode` does; ChatML template with Qwen-1's
  default system prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

from loraforge.models.native.base import ModuleMap, NativeFamily
from loraforge.models.native.tokenizers import read_tiktoken_ranks, save_fast_tokenizer, tiktoken_bpe

PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
           r"""\s+(?!\S)|\s+""")
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
EXTRAS = 205
DEFAULT_SYSTEM = "You are a helpful assistant."

H = "transformer.h.{i}"
L = "model.layers.{i}"
MODULES = (
    ModuleMap("model.embed_tokens", "transformer.wte"),
    ModuleMap(f"{L}.input_layernorm", f"{H}.ln_1"),
    ModuleMap(f"{L}.self_attn.q_proj", f"{H}.attn.c_attn", 0, 3),
    ModuleMap(f"{L}.self_attn.k_proj", f"{H}.attn.c_attn", 1, 3),
    ModuleMap(f"{L}.self_attn.v_proj", f"{H}.attn.c_attn", 2, 3),
    ModuleMap(f"{L}.self_attn.o_proj", f"{H}.attn.c_proj"),
    ModuleMap(f"{L}.post_attention_layernorm", f"{H}.ln_2"),
    ModuleMap(f"{L}.mlp.gate_proj", f"{H}.mlp.w2"),
    ModuleMap(f"{L}.mlp.up_proj", f"{H}.mlp.w1"),
    ModuleMap(f"{L}.mlp.down_proj", f"{H}.mlp.c_proj"),
    ModuleMap("model.norm", "transformer.ln_f"),
    ModuleMap("lm_head", "lm_head"),
)


def claims(raw: dict) -> bool:
    return raw.get("model_type") == "qwen" or "QWenLMHeadModel" in (raw.get("architectures") or [])


def refusal(raw: dict, src: Path) -> str | None:
    if float(raw.get("rotary_pct", 1.0)) != 1.0:
        return f"config.json `rotary_pct: {raw['rotary_pct']}`: native Qwen2 rotates the whole head (rotary_pct 1)"
    if raw.get("kv_channels") and raw["kv_channels"] * raw["num_attention_heads"] != raw["hidden_size"]:
        return "kv_channels × num_attention_heads differs from hidden_size (native Qwen2 needs them equal)"
    if not (src / "qwen.tiktoken").is_file():
        return "qwen.tiktoken (the Qwen-1 vocabulary) is missing from the checkpoint folder"
    return None


def variant(raw: dict, src: Path) -> str:
    return "qwen1"


def native_config(raw: dict, src: Path) -> dict:
    heads = raw["num_attention_heads"]
    layers = raw["num_hidden_layers"]
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "vocab_size": raw["vocab_size"], "hidden_size": raw["hidden_size"],
        "intermediate_size": raw["intermediate_size"] // 2, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": heads, "hidden_act": "silu",
        "max_position_embeddings": raw.get("seq_length", 2048), "rms_norm_eps": raw.get("layer_norm_epsilon", 1e-6),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(raw.get("rotary_emb_base", 10000))},
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": layers,
        "layer_types": ["full_attention"] * layers, "attention_dropout": 0.0,
        "initializer_range": raw.get("initializer_range", 0.02), "tie_word_embeddings": False, "use_cache": True,
        "bos_token_id": None, "eos_token_id": _eod(src), "pad_token_id": _eod(src),
        "dtype": "bfloat16" if raw.get("bf16") or not raw.get("fp16") else "float16",
    }


def _eod(src: Path) -> int:
    return len(read_tiktoken_ranks(src / "qwen.tiktoken"))


def part_sizes(native: dict) -> list[int]:
    return [native["hidden_size"]] * 3


def _template(system: str) -> str:
    # qwen_generation_utils.make_context(chat_format="chatml"): turns joined by "\n"; Qwen-1's chat() uses
    # "You are a helpful assistant." when no system message is given.
    return ("{%- if not messages or messages[0]['role'] != 'system' -%}"
            "{{- '<|im_start|>system\n" + system + "<|im_end|>\n' -}}{%- endif -%}"
            "{%- for m in messages -%}"
            "{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' -}}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}")


def tokenizer(src: Path, out: Path, raw: dict, native: dict) -> None:
    n = _eod(src)
    specials = {ENDOFTEXT: n, IM_START: n + 1, IM_END: n + 2}
    specials.update({f"<|extra_{k}|>": n + 3 + k for k in range(EXTRAS)})
    tok = tiktoken_bpe(src / "qwen.tiktoken", PAT_STR, specials)
    cfg = json.loads((src / "tokenizer_config.json").read_text()) if (src / "tokenizer_config.json").is_file() else {}
    save_fast_tokenizer(tok, out, chat_template=_template(DEFAULT_SYSTEM), padding_side="left",
                        model_max_length=cfg.get("model_max_length", raw.get("seq_length", 8192)),
                        special={"eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT})


def generation_config(raw: dict, src: Path, native: dict) -> dict:
    path = src / "generation_config.json"
    gen = json.loads(path.read_text()) if path.is_file() else {}
    n = native["eos_token_id"]
    keep = {k: gen[k] for k in ("max_new_tokens", "top_k", "top_p", "repetition_penalty", "do_sample") if k in gen}
    if keep.get("top_k") == 0:
        keep.pop("top_k")
    # Qwen-1's generate stops on <|im_end|> and <|im_start|> (stop_words_ids for chatml) besides <|endoftext|>.
    eos = [n, n + 2, n + 1] if gen.get("chat_format", "chatml") == "chatml" else n
    return {**keep, "eos_token_id": eos, "pad_token_id": n}


def seq_limit(native: dict) -> tuple[int, str]:
    return native["max_position_embeddings"], (
        "Qwen-1's dynamic NTK and logn attention act beyond seq_length; the native Qwen2 conversion has neither, "
        "so sequences longer than this would not match the original model")


def notes(raw: dict) -> list[str]:
    out = [f"intermediate_size {raw['intermediate_size']} in config.json is twice the MLP width "
           f"({raw['intermediate_size'] // 2})"]
    if raw.get("use_dynamic_ntk") or raw.get("use_logn_attn"):
        out.append(f"dynamic NTK / logn attention act only beyond seq_length {raw.get('seq_length')}: "
                   "the conversion is exact up to it")
    return out


FAMILY = NativeFamily(
    name="qwen", native_architecture="Qwen2ForCausalLM", claims=claims, refusal=refusal, variant=variant,
    native_config=native_config, tokenizer=tokenizer, generation_config=generation_config, modules=MODULES,
    part_sizes=part_sizes, skip=(r"rotary_emb\.inv_freq$",), notes=notes, seq_limit=seq_limit)
