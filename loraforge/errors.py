"""User-facing errors: every problem names the key (or file:line), the bad value, what is allowed and the fix.

A `LoraforgeError` carries a list of `Problem`s so that all mistakes are reported together; the CLI prints
them and exits with code 2 instead of showing a traceback.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Iterable

EXIT_USER_ERROR = 2


@dataclass(frozen=True)
class Problem:
    """One mistake in user input.

    Attributes:
        key: where it is — a dotted config key (``lora.r``), ``file:line`` for data, or a module name.
        message: what is wrong, in one sentence.
        value: the offending value (``None`` when there is none to show).
        allowed: what would be accepted (values, range or type).
        fix: the suggested correction, e.g. ``did you mean `learning_rate`?``.
    """

    key: str
    message: str
    value: Any = None
    allowed: str | None = None
    fix: str | None = None

    def format(self) -> str:
        text = f"{self.key}: {self.message}"
        if self.value is not None:
            text += f" (got {_short_repr(self.value)})"
        if self.allowed:
            text += f"\n    allowed: {self.allowed}"
        if self.fix:
            text += f"\n    fix: {self.fix}"
        return text


def _short_repr(value: Any) -> str:
    """repr() cut to a readable size without building the whole text first: a YAML alias bomb or a megabyte
    string as a bad value must not hang or flood the error message."""
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxtuple, short.maxdict, short.maxset = 3, 6, 6, 6, 6
    short.maxstring, short.maxother, short.maxlong = 200, 200, 60
    return short.repr(value)


class LoraforgeError(Exception):
    """A mistake in user input (config, data, model choice). Never a bug in loraforge."""

    title = "loraforge found a problem"

    def __init__(self, problems: Iterable[Problem] | str, title: str | None = None):
        if isinstance(problems, str):
            problems = [Problem(key="error", message=problems)]
        self.problems = list(problems)
        if title:
            self.title = title
        super().__init__(self.format())

    def format(self) -> str:
        n = len(self.problems)
        head = f"{self.title} ({n} problem{'s' if n != 1 else ''}):"
        return "\n".join([head] + ["  - " + p.format().replace("\n", "\n  ") for p in self.problems])


class ConfigError(LoraforgeError):
    title = "invalid config"


class DataError(LoraforgeError):
    title = "invalid data"


class ModelError(LoraforgeError):
    title = "model does not fit the config"


def did_you_mean(word: str, candidates: Iterable[str], n: int = 1, cutoff: float = 0.6) -> list[str]:
    """The closest candidates to ``word`` (case-insensitive), best first."""
    cands = list(candidates)
    lower = {c.lower(): c for c in cands}
    hits = difflib.get_close_matches(word.lower(), list(lower), n=n, cutoff=cutoff)
    return [lower[h] for h in hits]


def suggestion(word: str, candidates: Iterable[str]) -> str | None:
    """``did you mean `x`?`` or None."""
    hits = did_you_mean(word, candidates)
    return f"did you mean `{hits[0]}`?" if hits else None
