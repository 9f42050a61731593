"""Stage 2 of the data pipeline: chat messages → token ids + labels. The loss mask lives here, in one function.

A conversation is rendered as a sequence of text *segments*, each either a prompt part (masked, label -100) or
an assistant reply (trained). Segments are tokenized one by one and concatenated, and `build_generation_ids`
uses the very same segments for inference, so a prompt at chat/serve/eval time is the exact token sequence the
model saw in training.

Templates:
* ``auto``: the tokenizer's own chat template (``apply_chat_template``). The reply spans are found by rendering
  growing prefixes of the conversation — with the generation prompt (where a reply starts) and without (where it
  ends) — so no ``{% generation %}`` markers are needed (TRL's assistant-only loss requires them and fails on
  SmolLM2's template; FINDINGS trap 7). Falls back to ``chatml`` when the tokenizer has no template.
* ``chatml``, ``alpaca``, ``plain``: built in, for base-model tokenizers without a template.

Why the end-of-turn token is trained: it is how the model learns to stop. Tokens the template puts *after* it
(ChatML's newline) are masked, since generation stops at the end-of-turn token and never produces them. The mask
is built from the segments and never by comparing ids with the pad id: SmolLM2's pad id *is* its EOS id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from loraforge.errors import DataError, Problem

IGNORE_INDEX = -100
TEMPLATES = ("auto", "chatml", "alpaca", "plain")
# End-of-turn tokens of common chat templates; `auto` stops on those its template actually uses.
KNOWN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
                    "</s>", "<|user|>", "<|observation|>")
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")

Message = dict[str, str]


@dataclass
class Encoded:
    """One tokenized example. `labels[i]` is the target for `input_ids[i]` (HF convention: the model shifts),
    -100 where no loss is taken."""

    input_ids: list[int]
    labels: list[int]
    source: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        """Positions that contribute to the loss (label 0 is never predicted: there is no token before it)."""
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


@dataclass(frozen=True)
class Segment:
    text: str
    trained: bool


# ---------------------------------------------------------------------------------------------- public API


def encode_conversation(tokenizer: Any, messages: Sequence[Message], *, template: str = "auto", cutoff_len: int,
                        train_on_prompt: bool = False, source: str = "") -> tuple[Encoded, bool]:
    """Token ids and labels for one checked conversation (the only place the loss mask is decided).

    Every assistant reply and its end-of-turn / EOS token are trained; everything else gets -100 unless
    `train_on_prompt`. Longer than `cutoff_len`: the start is kept and the end cut off; an example left with no
    trained token has `trained_tokens == 0` and must be dropped by the caller.

    Returns:
        (encoded, truncated)

    Raises:
        DataError: the template cannot render this conversation or cannot be split into prompt and replies.
    """
    ids: list[int] = []
    labels: list[int] = []
    stops = set(stop_token_ids(tokenizer, template))
    for seg in _segments(tokenizer, messages, template, add_generation_prompt=False):
        seg_ids = _tokenize(tokenizer, seg.text)
        if not seg.trained:
            ids += seg_ids
            labels += seg_ids if train_on_prompt else [IGNORE_INDEX] * len(seg_ids)
            continue
        # Train through the last end-of-turn token of the reply; what the template adds after it is prompt.
        end = max((i for i, t in enumerate(seg_ids) if t in stops), default=None)
        if end is None:
            # The template ends replies with no stop token: append EOS so the model still learns to stop.
            seg_ids, end = seg_ids + [_eos_id(tokenizer)], len(seg_ids)
        ids += seg_ids
        labels += seg_ids[:end + 1] + (seg_ids[end + 1:] if train_on_prompt else [IGNORE_INDEX] * (len(seg_ids) - end - 1))
    return truncate(Encoded(ids, labels, source), cutoff_len)


def truncate(encoded: Encoded, cutoff_len: int) -> tuple[Encoded, bool]:
    """Keep the first `cutoff_len` tokens (the prompt comes first, so the reply's end is what is lost)."""
    if len(encoded.input_ids) <= cutoff_len:
        return encoded, False
    return Encoded(encoded.input_ids[:cutoff_len], encoded.labels[:cutoff_len], encoded.source), True


def build_generation_ids(tokenizer: Any, messages: Sequence[Message], template: str = "auto") -> list[int]:
    """Prompt ids for generation: the conversation so far plus the assistant generation prompt, tokenized
    segment by segment exactly as `encode_conversation` does in training.

    `messages` must not end with an assistant message (the model writes that one).
    """
    ids: list[int] = []
    for seg in _segments(tokenizer, messages, template, add_generation_prompt=True):
        seg_ids = _tokenize(tokenizer, seg.text)
        if seg.trained:
            stops = set(stop_token_ids(tokenizer, template))
            if not any(t in stops for t in seg_ids):
                seg_ids = seg_ids + [_eos_id(tokenizer)]  # as in training (see encode_conversation)
        ids += seg_ids
    return ids


def stop_token_ids(tokenizer: Any, template: str = "auto") -> list[int]:
    """Token ids that end an assistant reply for this tokenizer + template (EOS first)."""
    name = resolve_template(tokenizer, template)
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if name == "auto":
        chat_template = tokenizer.chat_template
        # a tokenizer may carry several named templates (a dict); any of them may name the end-of-turn token
        source = chat_template if isinstance(chat_template, str) else " ".join(map(str, dict(chat_template).values()))
        candidates = [t for t in KNOWN_END_TOKENS if t in source]
    elif name == "chatml":
        candidates = ["<|im_end|>"]
    else:
        candidates = []
    for token in candidates:
        tid = _single_token_id(tokenizer, token)
        if tid is not None and tid not in ids:
            ids.append(tid)
    return ids


def resolve_template(tokenizer: Any, template: str) -> str:
    """`auto` stays `auto` when the tokenizer has a chat template, else becomes `chatml`.

    Raises:
        DataError: an unknown template name.
    """
    if template not in TEMPLATES:
        raise DataError([Problem("template", "unknown template", value=template, allowed=", ".join(TEMPLATES))])
    if template == "auto" and not getattr(tokenizer, "chat_template", None):
        return "chatml"
    return template


def render_text(tokenizer: Any, messages: Sequence[Message], template: str = "auto",
                add_generation_prompt: bool = False) -> str:
    """The conversation as the text training and inference tokenize (the segments joined); exporters compare
    other engines' templates (Ollama's Modelfile, a GGUF's chat template) with it."""
    return "".join(s.text for s in _segments(tokenizer, messages, template, add_generation_prompt))


def tokenization_matches(tokenizer: Any, messages: Sequence[Message], template: str = "auto") -> bool:
    """Whether tokenizing the segments one by one gives the same ids as tokenizing the whole rendered text.

    True for templates whose segment borders fall on special tokens or newlines (ChatML, SmolLM2, Llama-3);
    a BPE merge across a border would make them differ. Training and our own inference agree either way (both
    use the segments); this tells whether other engines that tokenize the full text (vLLM…) agree too.
    """
    segments = _segments(tokenizer, messages, template, add_generation_prompt=False)
    by_segment = [t for s in segments for t in _tokenize(tokenizer, s.text)]
    return by_segment == _tokenize(tokenizer, "".join(s.text for s in segments))


# ---------------------------------------------------------------------------------------------- segments


def _segments(tokenizer: Any, messages: Sequence[Message], template: str,
              add_generation_prompt: bool) -> list[Segment]:
    name = resolve_template(tokenizer, template)
    if name == "auto":
        return _auto_segments(tokenizer, list(messages), add_generation_prompt)
    return _builtin_segments(tokenizer, name, list(messages), add_generation_prompt)


def _render(tokenizer: Any, messages: list[Message], add_generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raises its own errors (e.g. "roles must alternate") from inside the template
        raise DataError([Problem("template", f"the tokenizer's chat template cannot render this conversation: {e}",
                                 value="auto", fix="use `template: chatml` (or fix the data's role order)")]) from e
    if not isinstance(text, str):
        raise DataError([Problem("template", "apply_chat_template did not return text", value="auto",
                                 fix="use `template: chatml`")])
    return text


def _auto_segments(tokenizer: Any, messages: list[Message], add_generation_prompt: bool) -> list[Segment]:
    """Split the tokenizer's rendering into prompt / reply segments by rendering growing prefixes.

    For assistant message k: render(messages[:k], generation prompt) ends where the reply starts, and
    render(messages[:k+1]) ends where it ends. Each must extend the previous rendering; a template that
    rewrites earlier turns (e.g. strips reasoning from old replies) cannot be split and is refused.
    """
    segments: list[Segment] = []
    done = ""  # text already assigned to segments
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:k], add_generation_prompt=True)
        after = _render(tokenizer, messages[:k + 1], add_generation_prompt=False)
        if not before.startswith(done) or not after.startswith(before):
            raise DataError([Problem("template", "the tokenizer's chat template renders earlier turns differently "
                                     "as the conversation grows, so replies cannot be located for the loss mask",
                                     value="auto", fix="use `template: chatml` (or another built-in template)")])
        if len(before) > len(done):
            segments.append(Segment(before[len(done):], trained=False))
        segments.append(Segment(after[len(before):], trained=True))
        done = after
    full = _render(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    if not full.startswith(done):
        raise DataError([Problem("template", "the tokenizer's chat template renders the whole conversation "
                                 "differently from its parts", value="auto", fix="use `template: chatml`")])
    if len(full) > len(done):
        segments.append(Segment(full[len(done):], trained=False))
    return segments


def _builtin_segments(tokenizer: Any, name: str, messages: list[Message], add_generation_prompt: bool) -> list[Segment]:
    """ChatML, Alpaca or plain text, written out here so the rendering is visible."""
    eos = tokenizer.eos_token
    if eos is None:
        raise DataError([Problem("template", "the tokenizer has no EOS token, so replies cannot be ended",
                                 value=name, fix="use a tokenizer with an EOS token or one with a chat template")])
    bos = _bos_text(tokenizer)
    prompt = bos
    segments: list[Segment] = []

    def reply(text: str) -> None:
        nonlocal prompt
        if prompt:
            segments.append(Segment(prompt, trained=False))
        segments.append(Segment(text, trained=True))
        prompt = ""

    if name == "chatml":
        # Without <|im_end|> in the vocabulary the literal text would never be one token to stop on: add EOS.
        end = "<|im_end|>" if _single_token_id(tokenizer, "<|im_end|>") is not None else "<|im_end|>" + eos
        for m in messages:
            if m["role"] == "assistant":
                prompt += "<|im_start|>assistant\n"
                reply(m["content"] + end)
                prompt += "\n"
            else:
                prompt += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
        if add_generation_prompt:
            prompt += "<|im_start|>assistant\n"
    elif name == "alpaca":
        system = next((m["content"] for m in messages if m["role"] == "system"), ALPACA_PREAMBLE)
        prompt += system + "\n\n"
        for m in messages:
            if m["role"] == "user":
                prompt += f"### Instruction:\n{m['content']}\n\n### Response:\n"
            elif m["role"] == "assistant":
                reply(m["content"] + eos)
                prompt += "\n\n"
        if not add_generation_prompt and messages and messages[-1]["role"] == "user":
            prompt = prompt[: -len("### Response:\n")]
    elif name == "plain":
        # Bare text: system, user and reply on their own lines; the EOS ends each reply.
        for m in messages:
            if m["role"] == "assistant":
                reply(m["content"] + eos)
                prompt += "\n"
            else:
                prompt += m["content"] + "\n"
    if prompt:
        segments.append(Segment(prompt, trained=False))
    return segments


# ---------------------------------------------------------------------------------------------- tokenizer helpers


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    # Templates write BOS/special tokens themselves as text; the tokenizer must not add another BOS.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _single_token_id(tokenizer: Any, token: str) -> int | None:
    ids = _tokenize(tokenizer, token)
    return int(ids[0]) if len(ids) == 1 else None


def _eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError([Problem("template", "the tokenizer has no EOS token, so replies cannot be ended",
                                 fix="use a tokenizer with an EOS token")])
    return int(tokenizer.eos_token_id)


def _bos_text(tokenizer: Any) -> str:
    """BOS as text when this tokenizer puts one in front of every sequence (Llama does, GPT-2/SmolLM2 do not)."""
    bos_id = tokenizer.bos_token_id
    if bos_id is None or tokenizer.bos_token is None:
        return ""
    plain = tokenizer("a")["input_ids"]
    return tokenizer.bos_token if plain and plain[0] == bos_id else ""
