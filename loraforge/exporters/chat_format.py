"""The run's chat template as per-message blocks, written out for other engines (Ollama's Go template, Jinja).

A template is read by rendering a few probe conversations through the same function training used
(`loraforge.data.templates.render_text`) and cutting the differences apart:

    R([user U])                          = default + user(U)          (default: e.g. SmolLM2's injected system turn)
    R([system S, user U])                = system(S) + user(U)
    R([system S, user U, assistant X])   = system(S) + user(U) + assistant(X)
    R([system S, user U], generation)    = system(S) + user(U) + generation_prompt
    R([system S, user U, assistant X, user V]) = ... + user(V)

Each block is `prefix + content + suffix`. The blocks are then re-assembled for several other conversations
(no system, multi-turn, with and without the generation prompt) and compared with the real rendering; a
template that does not decompose this way (Llama-2 puts the system text inside the first user turn) is refused
with the reason instead of exported wrong — the failure LLaMA-Factory's users hit with hand-written Modelfiles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from loraforge.errors import LoraforgeError, Problem

Render = Callable[[Sequence[dict], bool], str]
_S, _U, _X, _V = "LFPROBESYSTEM", "LFPROBEUSER", "LFPROBEREPLY", "LFPROBENEXT"

# Conversations every decomposition must reproduce exactly (the cases: system, multi-turn, generation).
CHECK_CONVERSATIONS: list[list[dict]] = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Hi! How can I help?"}, {"role": "user", "content": "Tell me a joke.\nA short one."},
     {"role": "assistant", "content": "Why did the chicken cross the road?"}],
]


@dataclass(frozen=True)
class Block:
    prefix: str
    suffix: str

    def __call__(self, content: str) -> str:
        return self.prefix + content + self.suffix


@dataclass(frozen=True)
class ChatFormat:
    """A chat template as blocks: `default` opens a conversation without a system message."""

    default: str
    system: Block
    user: Block
    assistant: Block
    generation_prompt: str

    def render(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        """The same text as the template (checked by `decompose`); the reference for the Go/Jinja writers."""
        out = "" if messages and messages[0]["role"] == "system" else self.default
        for m in messages:
            out += getattr(self, m["role"])(m["content"])
        if add_generation_prompt and (not messages or messages[-1]["role"] != "assistant"):
            out += self.generation_prompt
        return out


def decompose(render: Render, *, what: str = "the run's chat template") -> ChatFormat:
    """Cut `render`'s output into blocks and prove the blocks reproduce it.

    Raises:
        LoraforgeError: the template does not render each message as its own block.
    """
    def r(msgs: list[dict], gen: bool = False) -> str:
        return render(msgs, gen)

    def cut(text: str, start: str, sentinel: str) -> Block:
        if not text.startswith(start) or text[len(start):].count(sentinel) != 1:
            raise _refuse(what, f"a message's text does not appear once, after the turns before it ({sentinel!r})")
        prefix, suffix = text[len(start):].split(sentinel)
        return Block(prefix, suffix)

    sys_user = r([_m("system", _S), _m("user", _U)])
    with_reply = r([_m("system", _S), _m("user", _U), _m("assistant", _X)])
    next_user = r([_m("system", _S), _m("user", _U), _m("assistant", _X), _m("user", _V)])
    user = cut(next_user, with_reply, _V)
    assistant = cut(with_reply, sys_user, _X)
    generation = r([_m("system", _S), _m("user", _U)], True)
    if not generation.startswith(sys_user):
        raise _refuse(what, "the generation prompt does not follow the conversation")
    user_u = user(_U)
    if not sys_user.endswith(user_u):
        raise _refuse(what, "the first user turn is rendered differently from later ones")
    system = cut(sys_user[: len(sys_user) - len(user_u)], "", _S)
    alone = r([_m("user", _U)])
    if not alone.endswith(user_u):
        raise _refuse(what, "a conversation without a system message renders its first user turn differently")
    fmt = ChatFormat(default=alone[: len(alone) - len(user_u)], system=system, user=user, assistant=assistant,
                     generation_prompt=generation[len(sys_user):])
    for conversation in CHECK_CONVERSATIONS:
        ends_with_user = conversation[-1]["role"] == "user"
        for gen in (True, False) if ends_with_user else (False,):
            if fmt.render(conversation, gen) != r(conversation, gen):
                raise _refuse(what, f"re-assembled blocks differ from the template on {json.dumps(conversation)[:80]}…")
    return fmt


def go_template(fmt: ChatFormat) -> str:
    """An Ollama `TEMPLATE` (Go text/template over `.Messages`) that renders like `fmt`.

    Every literal is a quoted Go string action, so the `{{-` trim markers used for layout never eat template
    text (a bare `\\n` before `{{-` would be trimmed away).
    """
    def lit(text: str) -> str:
        return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""

    def block(b: Block) -> str:
        return f"{lit(b.prefix)}{{{{ .Content }}}}{lit(b.suffix)}"

    return "\n".join([
        '{{- if or (not .Messages) (ne (index .Messages 0).Role "system") }}' + lit(fmt.default) + "{{ end }}",
        "{{- range $i, $_ := .Messages }}",
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}",
        '{{- if eq .Role "system" }}' + block(fmt.system),
        '{{- else if eq .Role "user" }}' + block(fmt.user),
        '{{- else if eq .Role "assistant" }}' + block(fmt.assistant),
        "{{- end }}",
        '{{- if and $last (ne .Role "assistant") }}' + lit(fmt.generation_prompt) + "{{ end }}",
        "{{- end }}",
    ])


def jinja_template(fmt: ChatFormat) -> str:
    """A Hugging Face / llama.cpp Jinja chat template that renders like `fmt` (for runs trained with a
    built-in template such as `chatml` or `alpaca`, whose tokenizer may carry a different one)."""
    def lit(text: str) -> str:
        return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""

    def block(b: Block) -> str:
        return f"{lit(b.prefix)}{{{{ message['content'] }}}}{lit(b.suffix)}"

    return "".join([
        "{%- if not messages or messages[0]['role'] != 'system' %}", lit(fmt.default), "{%- endif %}",
        "{%- for message in messages %}",
        "{%- if message['role'] == 'system' %}", block(fmt.system),
        "{%- elif message['role'] == 'user' %}", block(fmt.user),
        "{%- elif message['role'] == 'assistant' %}", block(fmt.assistant),
        "{%- endif %}{%- endfor %}",
        "{%- if add_generation_prompt and (not messages or messages[-1]['role'] != 'assistant') %}",
        lit(fmt.generation_prompt), "{%- endif %}",
    ])


def run_render(tokenizer: Any, template: str) -> Render:
    """The run's own rendering: its `template` setting applied exactly as in training."""
    from loraforge.data.templates import render_text

    return lambda messages, gen: render_text(tokenizer, list(messages), template, add_generation_prompt=gen)


def _m(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _refuse(what: str, why: str) -> LoraforgeError:
    return LoraforgeError([Problem("template", f"{what} cannot be written as per-message blocks: {why}",
                                   fix="train with `template: chatml`, or write the Modelfile's TEMPLATE by hand "
                                       "from the GGUF's tokenizer.chat_template")], title="cannot export the chat template")
