"""`loraforge chat`: an interactive loop over one `InferenceModel`, with `/adapter NAME` switching."""

from __future__ import annotations

from typing import Callable

from loraforge.errors import LoraforgeError, suggestion
from loraforge.inference.model import InferenceModel
from loraforge.inference.prompts import check_text
from loraforge.inference.settings import BASE, GenerationSettings, Message

CHAT_HELP = """commands:
  /adapter          show the current adapter and the loaded ones
  /adapter NAME     switch adapter (`/adapter base` = no adapter)
  /reset            forget the conversation
  /quit             leave (also Ctrl-D)"""


def chat_repl(model: InferenceModel, input_fn: Callable[[str], str] = input, print_fn: Callable[..., None] = print,
              *, adapter: str | None = None, settings: GenerationSettings | None = None,
              system_prompt: str | None = None) -> list[Message]:
    """Interactive chat: each line is a user turn answered (streamed) with the current adapter.

    Starts on `adapter`, or on the first loaded adapter, or on `base`. Returns the final history.
    """
    settings = settings or GenerationSettings()
    current = adapter or (model.adapter_names[1] if len(model.adapter_names) > 1 else BASE)
    if current not in model.adapter_names:
        model.check_adapter(current)  # raises the unknown-adapter error with the list
    history: list[Message] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    print_fn(f"chatting with adapter `{current}` (loaded: {', '.join(model.adapter_names)}); /help for commands")
    while True:
        try:
            line = input_fn(f"[{current}] > ")
        except (EOFError, KeyboardInterrupt):
            print_fn("")
            return history
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            arg = arg.strip()
            if cmd in ("/quit", "/exit", "/q"):
                return history
            if cmd == "/reset":
                history = history[:1] if system_prompt else []
                print_fn("conversation cleared")
            elif cmd == "/adapter" and not arg:
                print_fn(f"current: {current}; loaded: {', '.join(model.adapter_names)}")
            elif cmd == "/adapter":
                if arg in model.adapter_names:
                    current = arg
                    print_fn(f"switched to `{current}`")
                else:
                    hint = suggestion(arg, model.adapter_names)
                    print_fn(f"unknown adapter `{arg}`; loaded: {', '.join(model.adapter_names)}" + (f" ({hint})" if hint else ""))
            else:
                print_fn(CHAT_HELP)
            continue
        try:
            check_text(line, "your message")
        except LoraforgeError as err:  # an undecodable byte from the terminal: say so and keep chatting
            print_fn(err.format())
            continue
        history.append({"role": "user", "content": line})
        stream = model.stream(history, current, settings)
        for delta in stream:
            print_fn(delta, end="", flush=True)
        print_fn("")
        answer = stream.result.text if stream.result else ""
        history.append({"role": "assistant", "content": answer})

