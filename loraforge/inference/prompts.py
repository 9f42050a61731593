"""Prompt token ids rendered as in training, and the token ids that end an answer."""

from __future__ import annotations

from typing import Any, Sequence

from loraforge.errors import LoraforgeError, Problem
from loraforge.inference.settings import Message


def check_text(text: str, key: str = "prompt") -> None:
    """Refuse text no tokenizer can encode: a lone surrogate, which is what Python makes of an invalid UTF-8 byte
    in a command-line argument or a terminal line (the tokenizer would raise a bare TypeError).

    Raises:
        LoraforgeError: naming `key` and the fix.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise LoraforgeError([Problem(key, f"is not valid UTF-8 text (character {err.start} is an undecodable byte "
                                           "or a lone surrogate)", value=text[max(err.start - 20, 0):err.start + 20],
                                      fix="set the terminal to UTF-8 (e.g. LANG=C.UTF-8) or retype the text")]) from None


def render_prompt_ids(tokenizer: Any, messages: Sequence[Message], template: str = "auto",
                      system_prompt: str | None = None) -> list[int]:
    """Token ids of a chat prompt ending with the assistant generation prompt, rendered exactly as in training.

    The training data pipeline owns the template code (`loraforge.data.templates`); this is the one place
    inference calls it, with the tokenizer's own chat template as a fallback for older installs.
    """
    msgs = [dict(m) for m in messages]
    if system_prompt and not any(m.get("role") == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": system_prompt})
    try:
        from loraforge.data.templates import build_generation_ids
    except ImportError:
        build_generation_ids = None
    if build_generation_ids is not None:
        return list(build_generation_ids(tokenizer, msgs, template))
    text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_token_ids(tokenizer: Any, model_config: Any, template: str = "auto") -> list[int]:
    """Token ids that end an answer: the tokenizer's EOS, the model's generation EOS ids and the template's
    end-of-turn token (`<|im_end|>` for ChatML)."""
    ids: list[int] = []
    gen = getattr(model_config, "eos_token_id", None)
    for value in ([gen] if isinstance(gen, int) else list(gen or [])) + [tokenizer.eos_token_id]:
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    try:
        from loraforge.data.templates import stop_token_ids
    except ImportError:
        stop_token_ids = None
    if stop_token_ids is not None:
        extra = list(stop_token_ids(tokenizer, template))
    else:
        extra = [t for t in (tokenizer.convert_tokens_to_ids("<|im_end|>"),) if isinstance(t, int) and t != tokenizer.unk_token_id]
    return ids + [t for t in extra if t not in ids]
