"""ChatGLM2-6B / ChatGLM3-6B → transformers' `GlmForCausalLM`. A `chatglm`-format GLM-4-9B has the same weights
layout but a tiktoken vocabulary as tokenizer.model, which is not converted: it is refused by name.

* `query_key_value` = [q (heads × kv_channels); k; v (groups × kv_channels each)] rows, with bias;
  multi-query groups → `num_key_value_heads` (no multi-query: one group per head);
* `dense_h_to_4h` = [gate; up] — exactly native GLM's `gate_up_proj`;
* RoPE on the first half of each head in interleaved pairs, base 10000 × `rope_ratio` → `partial_rotary_factor`
  0.5 (native GLM's interleaved rotary); RMSNorm; untied `output_layer`.
* Tokenizer: the SentencePiece model plus `[MASK] [gMASK] [sMASK] sop eop` (and ChatGLM3's role tokens) after
  the pieces; role tokens typed in text stay text, as in the original.

ChatGLM-6B v1 (GLM-130B style: 2D positions, GeLU, post-LN mixing) has no native equivalent and is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from loraforge.models.native.base import ModuleMap, NativeFamily
from loraforge.models.native.tokenizers import (add_control_tokens, control, save_fast_tokenizer,
                                                sentencepiece_bpe)

GLM_SPECIAL = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
GLM3_ROLES = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]

MODULES = (
    ModuleMap("model.embed_tokens", "transformer.embedding.word_embeddings"),
    ModuleMap("model.layers.{i}.input_layernorm", "transformer.encoder.layers.{i}.input_layernorm"),
    ModuleMap("model.layers.{i}.self_attn.q_proj", "transformer.encoder.layers.{i}.self_attention.query_key_value", 0, 3),
    ModuleMap("model.layers.{i}.self_attn.k_proj", "transformer.encoder.layers.{i}.self_attention.query_key_value", 1, 3),
    ModuleMap("model.layers.{i}.self_attn.v_proj", "transformer.encoder.layers.{i}.self_attention.query_key_value", 2, 3),
    ModuleMap("model.layers.{i}.self_attn.o_proj", "transformer.encoder.layers.{i}.self_attention.dense"),
    ModuleMap("model.layers.{i}.post_attention_layernorm", "transformer.encoder.layers.{i}.post_attention_layernorm"),
    ModuleMap("model.layers.{i}.mlp.gate_up_proj", "transformer.encoder.layers.{i}.mlp.dense_h_to_4h"),
    ModuleMap("model.layers.{i}.mlp.down_proj", "transformer.encoder.layers.{i}.mlp.dense_4h_to_h"),
    ModuleMap("model.norm", "transformer.encoder.final_layernorm"),
    ModuleMap("lm_head", "transformer.output_layer"),
)


def claims(raw: dict) -> bool:
    return raw.get("model_type") == "chatglm" or any(a.startswith("ChatGLM") for a in raw.get("architectures") or [])


def _is_v1(raw: dict) -> bool:
    return "position_encoding_2d" in raw or ("inner_hidden_size" in raw and "ffn_hidden_size" not in raw)


def refusal(raw: dict, src: Path) -> str | None:
    if _is_v1(raw):
        return ("ChatGLM-6B (v1, GLM-130B style: 2D position encoding, GeLU, its own residual scaling) has no "
                "native transformers architecture; ChatGLM2-6B and ChatGLM3-6B convert")
    unsupported = {"rmsnorm": (True,), "add_bias_linear": (False,), "post_layer_norm": (True,),
                   "apply_residual_connection_post_layernorm": (False,)}
    for key, ok in unsupported.items():
        if key in raw and raw[key] not in ok:
            return f"config.json `{key}: {raw[key]}` has no counterpart in native GLM (expected {ok[0]})"
    if _tiktoken_vocabulary(src):
        return ("its tokenizer.model is a tiktoken vocabulary (GLM-4's), not ChatGLM2/3's SentencePiece model: "
                "loraforge does not convert that tokenizer; the transformers-native `-hf` GLM-4 checkpoints "
                "(e.g. THUDM/glm-4-9b-chat-hf) load directly as base_model")
    if raw.get("pre_seq_len"):
        return ("config.json sets `pre_seq_len` (a P-tuning v2 checkpoint): convert the base model and train "
                "prefix/P-tuning on the converted one")
    return None


def _tiktoken_vocabulary(src: Path) -> bool:
    """GLM-4's `tokenizer.model` is text lines `<base64 token> <rank>`; a SentencePiece model is a protobuf."""
    import re

    path = Path(src) / "tokenizer.model"
    if not path.is_file():
        return False
    with path.open("rb") as f:
        head = f.read(256).split(b"\n")[0]
    return re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", head) is not None


def _has_roles(src: Path) -> bool:
    # ChatGLM3's tokenizer adds the role tokens; ChatGLM2's does not. The checkpoints differ in name and code only.
    name = json.loads((src / "tokenizer_config.json").read_text()).get("name_or_path", "") \
        if (src / "tokenizer_config.json").is_file() else ""
    code = src / "tokenization_chatglm.py"
    if code.is_file():
        return "<|user|>" in code.read_text(errors="replace")
    return "chatglm3" in name.lower() or "glm-4" in name.lower() or "chatglm3" in str(src).lower()


def variant(raw: dict, src: Path) -> str:
    text = (raw.get("_name_or_path") or "").lower()
    if "glm-4" in text or "glm4" in text:
        return "glm4-chatglm"
    return "chatglm3" if ("chatglm3" in text or _has_roles(src)) else "chatglm2"


def native_config(raw: dict, src: Path) -> dict:
    heads = raw["num_attention_heads"]
    groups = raw.get("multi_query_group_num", heads) if raw.get("multi_query_attention") else heads
    head_dim = raw.get("kv_channels") or raw["hidden_size"] // heads
    v = variant(raw, src)
    eos = [raw.get("eos_token_id", 2)]
    if v != "chatglm2":
        first = _sp_size(src)
        ids = {n: first + len(GLM_SPECIAL) + k for k, n in enumerate(GLM3_ROLES)}
        eos += [ids["<|user|>"], ids["<|observation|>"]]
    return {
        "architectures": ["GlmForCausalLM"], "model_type": "glm",
        "vocab_size": raw["padded_vocab_size"], "hidden_size": raw["hidden_size"],
        "intermediate_size": raw["ffn_hidden_size"], "num_hidden_layers": raw["num_layers"],
        "num_attention_heads": heads, "num_key_value_heads": groups, "head_dim": head_dim,
        "hidden_act": "silu", "attention_bias": bool(raw.get("add_qkv_bias", True)), "attention_dropout": 0.0,
        "max_position_embeddings": raw.get("seq_length", 8192), "rms_norm_eps": raw.get("layernorm_epsilon", 1e-5),
        "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5,
                            "rope_theta": 10000.0 * float(raw.get("rope_ratio", 1))},
        "initializer_range": 0.02, "tie_word_embeddings": False, "use_cache": True,
        "pad_token_id": raw.get("pad_token_id", 0), "eos_token_id": eos if len(eos) > 1 else eos[0],
        "bos_token_id": None, "dtype": raw.get("torch_dtype", "float16"),
    }


def part_sizes(native: dict) -> list[int]:
    q = native["num_attention_heads"] * native["head_dim"]
    kv = native["num_key_value_heads"] * native["head_dim"]
    return [q, kv, kv]


def _sp_size(src: Path) -> int:
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString((src / "tokenizer.model").read_bytes())
    return len(proto.pieces)


def _template_glm3(c: dict[str, str]) -> str:
    roles = {r: c[f"<|{r}|>"] for r in ("system", "user", "assistant", "observation")}
    role_map = "{" + ", ".join(f"{k!r}: {v!r}" for k, v in roles.items()) + ", 'tool': " + repr(roles["observation"]) + "}"
    # `<|role|>` + encode(metadata + "\n") + encode(content): each encode has SentencePiece's dummy prefix,
    # which the tokenizer adds to the text after a control token; the " " before the content is the second one.
    return ("{%- set roles = " + role_map + " -%}"
            "{{- " + repr(c["[gMASK]"] + c["sop"]) + " -}}"
            "{%- for m in messages -%}"
            "{%- if m['role'] not in roles -%}{{- raise_exception('ChatGLM3 roles are system, user, assistant, "
            "observation; got ' + m['role']) -}}{%- endif -%}"
            "{{- roles[m['role']] + (m.get('metadata') or '') + '\n' -}}"
            "{%- if m['content'] -%}{{- ' ' + m['content'] -}}{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- " + repr(roles["assistant"]) + " -}}{%- endif -%}")


def _template_glm2(c: dict[str, str]) -> str:
    # ChatGLM2's build_prompt: "[Round N]\n\n问：{q}\n\n答：{a}\n\n" per turn, in one piece after [gMASK] sop.
    return ("{{- " + repr(c["[gMASK]"] + c["sop"]) + " -}}"
            "{%- set ns = namespace(round=0) -%}"
            "{%- for m in messages -%}"
            "{%- if m['role'] == 'system' -%}{{- raise_exception('ChatGLM2 has no system role (its prompt format "
            "cannot represent a system message); put the instruction into the first user turn') -}}"
            "{%- elif m['role'] == 'user' -%}{%- set ns.round = ns.round + 1 -%}"
            "{%- if ns.round > 1 -%}{{- '\n\n' -}}{%- endif -%}"
            "{{- '[Round ' ~ ns.round ~ ']\n\n问：' ~ m['content'] ~ '\n\n答：' -}}"
            "{%- elif m['role'] == 'assistant' -%}{{- m['content'] -}}"
            "{%- else -%}{{- raise_exception('ChatGLM2 roles are user and assistant; got ' + m['role']) -}}"
            "{%- endif -%}{%- endfor -%}")


def tokenizer(src: Path, out: Path, raw: dict, native: dict) -> None:
    sp = sentencepiece_bpe(src / "tokenizer.model", controls_parse_in_text=False)
    v = variant(raw, src)
    names = GLM_SPECIAL + (GLM3_ROLES if v != "chatglm2" else [])
    ids = add_control_tokens(sp.tokenizer, names, len(sp.pieces))
    c = {n: control(n) for n in names}
    template = _template_glm2(c) if v == "chatglm2" else _template_glm3(c)
    eos_id = raw.get("eos_token_id", 2)
    save_fast_tokenizer(sp.tokenizer, out, chat_template=template, padding_side="left",
                        model_max_length=raw.get("seq_length", 8192),
                        special={"eos_token": sp.pieces[eos_id], "unk_token": sp.unk,
                                 "pad_token": sp.pieces[raw.get("pad_token_id", 0)]},
                        post_prefix=[(c["[gMASK]"], ids["[gMASK]"]), (c["sop"], ids["sop"])])


def generation_config(raw: dict, src: Path, native: dict) -> dict:
    return {"eos_token_id": native["eos_token_id"], "pad_token_id": native["pad_token_id"]}


def notes(raw: dict) -> list[str]:
    return ["multi-query attention: the converted GLM has "
            f"{raw.get('multi_query_group_num', raw['num_attention_heads']) if raw.get('multi_query_attention') else raw['num_attention_heads']}"
            " key/value heads; PEFT prefix tuning / P-tuning v2 builds prefixes for them (measured: forward, "
            "backward and cached generation run), ChatGLM's own `pre_seq_len` prefix encoder is not part of the "
            "conversion"]


FAMILY = NativeFamily(
    name="chatglm", native_architecture="GlmForCausalLM", claims=claims, refusal=refusal, variant=variant,
    native_config=native_config, tokenizer=tokenizer, generation_config=generation_config, modules=MODULES,
    part_sizes=part_sizes, skip=(r"rotary_pos_emb\.inv_freq$",), notes=notes)
