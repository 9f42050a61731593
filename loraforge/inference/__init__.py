"""Generation with one base model and any number of named adapters, switched per call.

`InferenceModel` holds the base model once and its adapters in an `AdapterPool`; the adapter name `base`
means "no adapter". The pieces, one job each:

- `settings`: `GenerationSettings` (what to sample) and `GenerationResult` (what came back), `BASE`.
- `adapter_files`: checks on an adapter folder and name before anything is read (roots, safetensors only),
  and the run's `config.yaml` beside it.
- `adapters`: `AdapterPool`, the PEFT side: LoRA adapters side by side in one PeftModel, prompt-learning ones
  in wrappers of their own, versioned for atomic replacement; which module runs a row.
- `prompts`: prompt ids rendered with the training template; the ids that end an answer.
- `generation`: one `generate` call's config, left padding, end-token and stop-string cuts.
- `model`: `InferenceModel` (load, adapters under one lock, generate / generate_batch / stream).
- `streaming`: `TextStream`, text deltas from a generation in a worker thread.
- `chat`: the `loraforge chat` loop.

Everything is importable from `loraforge.inference`; nothing here imports torch at import time.
"""

from __future__ import annotations

from loraforge.inference.adapter_files import check_adapter_name, read_run_config, resolve_adapter_path
from loraforge.inference.adapters import AdapterInfo, AdapterPool
from loraforge.inference.chat import CHAT_HELP, chat_repl
from loraforge.inference.model import InferenceModel
from loraforge.inference.prompts import end_token_ids, render_prompt_ids
from loraforge.inference.settings import BASE, GenerationResult, GenerationSettings, Message, PromptLike
from loraforge.inference.streaming import TextStream

__all__ = [
    "BASE", "CHAT_HELP", "AdapterInfo", "AdapterPool", "GenerationResult", "GenerationSettings", "InferenceModel",
    "Message", "PromptLike", "TextStream", "chat_repl", "check_adapter_name", "end_token_ids", "read_run_config",
    "render_prompt_ids", "resolve_adapter_path",
]
