"""Chat and compare: one base model and any adapters (run dirs or their checkpoints), the same prompt answered by
each, streamed. The loaded model is kept between requests and reloaded only when the base changes; an adapter
whose files changed since it was loaded (a run that trained on) is loaded again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Sequence

from loraforge.errors import LoraforgeError, Problem
from loraforge.webui.workspace import Workspace

from loraforge.webui.checks import heavy_lock as _lock  # loading shares the checks' lock


class ChatModels:
    def __init__(self, ws: Workspace):
        self.ws = ws
        self.model: Any = None
        self.base: str | None = None
        self.loaded: dict[str, tuple[str, float]] = {}  # adapter name → (dir, mtime of its weights)

    def _weights_mtime(self, path: Path) -> float:
        files = list(path.glob("adapter_model.*"))
        return max((f.stat().st_mtime for f in files), default=0.0)

    def prepare(self, base: str, adapters: Sequence[str]) -> tuple[Any, list[str]]:
        """The model with these adapters loaded; returns (model, adapter names in order).

        Raises:
            LoraforgeError: a path outside the workspace, or what `InferenceModel` refuses.
        """
        from loraforge.inference import InferenceModel

        base_path = base if base == "smollm2" or not base.strip() else str(self.ws.resolve(base, key="base"))
        dirs = [self.ws.resolve(a, key="adapter", must_exist=True) for a in adapters]
        with _lock:
            if self.model is None or self.base != base_path:
                self.model, self.base, self.loaded = InferenceModel.load(base_path or "smollm2"), base_path, {}
            names = []
            for d in dirs:
                name = _name_for(self.ws.relative(d))
                mtime = self._weights_mtime(d)
                if name in self.loaded and self.loaded[name] != (str(d), mtime):
                    self.model.replace_adapter(name, d)
                elif name not in self.loaded:
                    self.model.load_adapter(name, d)
                self.loaded[name] = (str(d), mtime)
                names.append(name)
            return self.model, names

    def stream(self, base: str, adapters: Sequence[str], prompt: str, *, system: str | None, settings: dict
               ) -> Iterator[str]:
        """NDJSON lines: {"variant", "delta"} while answering, {"variant", "done", "tokens"} after each answer,
        {"error": …} on a problem. The base answers first, then each adapter."""
        from loraforge.inference import GenerationSettings

        try:
            gen = GenerationSettings(max_new_tokens=int(settings.get("max_new_tokens", 64)),
                                     temperature=float(settings.get("temperature", 0.0)),
                                     top_p=float(settings.get("top_p", 1.0)),
                                     seed=None if settings.get("seed") in (None, "") else int(settings["seed"]))
            if not prompt.strip():
                raise LoraforgeError([Problem("prompt", "is empty", fix="type a message")])
            model, names = self.prepare(base, adapters)
        except (LoraforgeError, ValueError) as err:
            yield json.dumps({"error": err.format() if isinstance(err, LoraforgeError) else str(err)}) + "\n"
            return
        messages = ([{"role": "system", "content": system}] if system and system.strip() else []) + \
            [{"role": "user", "content": prompt}]
        for name in ["base", *names]:
            try:
                stream = model.stream(messages, adapter=name, settings=gen)
                for delta in stream:
                    yield json.dumps({"variant": name, "delta": delta}) + "\n"
                result = stream.result
                yield json.dumps({"variant": name, "done": True,
                                  "tokens": result.completion_tokens if result else None}) + "\n"
            except LoraforgeError as err:
                yield json.dumps({"variant": name, "error": err.format()}) + "\n"


def _name_for(rel: str) -> str:
    """An adapter name from its folder (`output/persona/checkpoint-4` → `output-persona-checkpoint-4`)."""
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in rel.strip("/"))[-64:].strip("-._") or "adapter"
    return name if name != "base" else "base-adapter"
