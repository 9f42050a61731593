"""What a generation call is asked for (`GenerationSettings`) and what it returns (`GenerationResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence, Union

from loraforge.errors import LoraforgeError, Problem

BASE = "base"  # the adapter name that means "no adapter"
# PEFT's own spelling of "no adapter for this row" in a mixed batch.
PEFT_BASE = "__base__"

Message = dict[str, str]
PromptLike = Union[str, Sequence[Message]]


@dataclass
class GenerationSettings:
    """How to sample. `temperature == 0` is greedy decoding (top_p is then ignored)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    max_time: float | None = None  # seconds of generation at most (the server's per-request bound)
    # A threading.Event checked after every token: once set, generation stops (the server's shutdown).
    cancel: Any = field(default=None, compare=False, repr=False)

    def validate(self) -> None:
        """Raises:
            LoraforgeError: a value out of range (each problem named).
        """
        problems = []
        if self.max_new_tokens < 1:
            problems.append(Problem("max_new_tokens", "must be at least 1", value=self.max_new_tokens, allowed=">= 1",
                                    fix="e.g. max_new_tokens 256"))
        if not self.temperature >= 0 or self.temperature == float("inf"):  # `not >=`: NaN fails it too
            problems.append(Problem("temperature", "must be a finite number >= 0", value=self.temperature,
                                    allowed=">= 0 (0 = greedy)", fix="e.g. temperature 0.7, or 0 for greedy decoding"))
        if not 0 < self.top_p <= 1:
            problems.append(Problem("top_p", "must be in (0, 1]", value=self.top_p, allowed="0 < top_p <= 1",
                                    fix="e.g. top_p 0.9, or 1 to sample from every token"))
        if any(not s for s in self.stop):
            problems.append(Problem("stop", "stop strings must not be empty", value=self.stop,
                                    fix="remove the empty stop string"))
        if problems:
            raise LoraforgeError(problems, title="invalid generation settings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class GenerationResult:
    """One finished generation. `finish_reason` is `stop` (end of turn or a stop string) or `length`."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    adapter: str = BASE
