"""A Hugging Face tokenizer as GGUF `tokenizer.*` metadata: vocabulary, merges, token types, special ids,
add-BOS/EOS flags and the chat template.

Two vocabulary kinds, as llama.cpp names them:
- `gpt2`: byte-level BPE (SmolLM2, Qwen2/3, Llama-3): tokens in id order plus the merge list.
- `llama`: SentencePiece-style BPE with byte fallback (Llama-2, Mistral, a converted Baichuan2): tokens with
  scores and types. llama.cpp merges the adjacent pair whose concatenation has the highest score, so from a
  fast tokenizer the score of a piece is minus the rank of the first merge that builds it (`_spm_tokens`):
  the order HF's BPE applies its merges. Only a slow tokenizer falls back to `tokenizer.model` (the `gguf`
  package's `SentencePieceVocab`). `add_space_prefix` (SentencePiece's dummy prefix, which llama.cpp applies
  unless told otherwise) is read off the tokenizer's own output, not a config flag.

`tokenizer.ggml.pre` names llama.cpp's pre-tokenizer regex. llama.cpp's converter identifies it by hashing a
test tokenization; here it comes from the base's source GGUF when the base was imported from one (the built-in
SmolLM2 says `smollm`), else from the family and the tokenizer's own pre-tokenizer (`_pre_tokenizer`).
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

# Byte-level BPE families → llama.cpp pre-tokenizer name (llama.cpp's src/llama-vocab.cpp lists them).
PRE_BY_FAMILY = {"qwen2": "qwen2", "qwen3": "qwen2"}


def add_tokenizer(writer: Any, tokenizer: Any, *, family: str, n_vocab: int, chat_template: str,
                  source_gguf: Path | None = None) -> str:
    """Write the tokenizer metadata; returns the vocabulary kind (`gpt2` or `llama`).

    Raises:
        LoraforgeError: a tokenizer that is neither byte-level BPE nor SentencePiece.
    """
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "is_fast", False) else None
    model = (spec or {}).get("model", {})
    byte_level = model.get("type") == "BPE" and not model.get("byte_fallback") and \
        (spec.get("decoder") or {}).get("type") == "ByteLevel"
    if byte_level:
        kind = "gpt2"
        tokens, types = _bpe_tokens(spec, n_vocab)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer(spec, family, source_gguf))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
        writer.add_add_space_prefix(False)
    else:
        kind = "llama"
        tokens, scores, types = _spm_tokens(spec) if model.get("type") == "BPE" else _sentencepiece_model(tokenizer)
        _check_size(len(tokens), n_vocab)
        pad = range(len(tokens), n_vocab)  # embedding rows past the vocabulary
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens + [f"[PAD{i}]" for i in pad])
        writer.add_token_scores(scores + [-1000.0 for _ in pad])
        writer.add_token_types(types + [int(gguf.TokenType.UNUSED) for _ in pad])
        writer.add_add_space_prefix(_adds_space_prefix(tokenizer))
    for name, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                      ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if tid is not None:
            getattr(writer, f"add_{name}_token_id")(int(tid))
    # Whether the tokenizer itself adds BOS/EOS, read off a real tokenization rather than a config flag
    # (transformers and tokenizers spell it in three different places).
    probe = list(tokenizer("a")["input_ids"])
    writer.add_add_bos_token(bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(bool(probe) and tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id
                             and len(probe) > 1)
    writer.add_chat_template(chat_template)
    return kind


def _bpe_tokens(spec: dict, n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens in id order; added special tokens are CONTROL (so prompts' `<|im_start|>` is one token),
    other added tokens USER_DEFINED; ids the tokenizer never uses (embedding padding) become `[PADi]`."""
    import gguf

    by_id: dict[int, str] = {int(i): t for t, i in spec["model"]["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in by_id}
    for added in spec.get("added_tokens", []):
        by_id[int(added["id"])] = added["content"]
        types[int(added["id"])] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    _check_size(max(by_id) + 1, n_vocab)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    return tokens, [int(types.get(i, gguf.TokenType.UNUSED)) for i in range(n_vocab)]


def _check_size(n_tokens: int, n_vocab: int) -> None:
    if n_tokens > n_vocab:
        from loraforge.errors import LoraforgeError, Problem

        raise LoraforgeError([Problem("tokenizer", "the tokenizer has more tokens than the model's embedding rows",
                                      value=f"{n_tokens} > {n_vocab}",
                                      fix="resize the model's embeddings to the tokenizer before exporting")])


def _spm_tokens(spec: dict) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, types) in id order from a fast tokenizer's BPE: `<0xNN>` pieces are BYTE, the unknown
    piece UNKNOWN, added special tokens CONTROL and other added tokens USER_DEFINED (llama.cpp matches those
    in raw text before merging, as transformers matches added tokens)."""
    import gguf

    model = spec["model"]
    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    kinds = {i: gguf.TokenType.BYTE if len(t) == 6 and t.startswith("<0x") and t.endswith(">")
             else gguf.TokenType.NORMAL for i, t in by_id.items()}
    for added in spec.get("added_tokens", []):
        by_id[int(added["id"])] = added["content"]
        kinds[int(added["id"])] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if model.get("unk_token") in model["vocab"]:
        kinds[model["vocab"][model["unk_token"]]] = gguf.TokenType.UNKNOWN
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]
    rank: dict[str, int] = {}
    for r, (left, right) in enumerate(merges):
        rank.setdefault(left + right, r)
    n = max(by_id) + 1
    missing = [i for i in range(n) if i not in by_id]
    if missing:
        from loraforge.errors import LoraforgeError, Problem

        raise LoraforgeError([Problem("tokenizer", "the vocabulary has ids without a token", value=missing[:5],
                                      fix="repair tokenizer.json (every id below the largest needs a token)")])
    tokens = [by_id[i] for i in range(n)]
    # Pieces no merge builds (single characters, bytes, specials) never win a merge in transformers either.
    scores = [float(-rank[t]) if t in rank else -1e9 for t in tokens]
    return tokens, scores, [int(kinds[i]) for i in range(n)]


def _sentencepiece_model(tokenizer: Any) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, types) of a slow SentencePiece tokenizer, from its saved `tokenizer.model`."""
    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        try:
            vocab = gguf.SentencePieceVocab(Path(tmp))
        except (FileNotFoundError, TypeError, ValueError) as e:
            from loraforge.errors import LoraforgeError, Problem

            raise LoraforgeError([Problem("tokenizer", f"this tokenizer is neither byte-level BPE nor SentencePiece "
                                          f"({e})", value=type(tokenizer).__name__,
                                          allowed="byte-level BPE (gpt2) or SentencePiece (llama) vocabularies")]) from e
        rows = list(vocab.all_tokens())
    return ([t.decode("utf-8") if isinstance(t, bytes) else t for t, _, _ in rows], [float(s) for _, s, _ in rows],
            [int(k) for _, _, k in rows])


def _adds_space_prefix(tokenizer: Any) -> bool:
    """Whether the tokenizer puts SentencePiece's `▁` before the first word ("a" → `▁a`), as observed."""
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode("a", add_special_tokens=False))
    return bool(pieces) and pieces[0].startswith("\u2581")


def _pre_tokenizer(spec: dict, family: str, source_gguf: Path | None) -> str:
    if source_gguf is not None:
        import gguf

        field = gguf.GGUFReader(str(source_gguf)).fields.get("tokenizer.ggml.pre")
        if field is not None:
            return str(field.contents())
    if family in PRE_BY_FAMILY:
        return PRE_BY_FAMILY[family]
    text = json.dumps(spec.get("pre_tokenizer"))
    if "\\\\p{N}{1,3}" in text:
        return "llama-bpe"  # Llama-3's regex: numbers in groups of up to three digits
    if '"Digits"' in text and '"individual_digits": true' in text:
        return "smollm"
    if '"ByteLevel"' in text and '"Split"' not in text:
        return "gpt-2"  # llama.cpp's spelling (the vocabulary *model* is `gpt2`, the pre-tokenizer `gpt-2`)
    warnings.warn("unrecognised byte-level pre-tokenizer: llama.cpp will use its default regex, which may split "
                  "some text (digits, punctuation) differently from transformers", stacklevel=3)
    return "default"
