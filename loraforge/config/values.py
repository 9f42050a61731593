"""Checks on raw config values that pydantic's lax parsing would let through, run before it.

pydantic turns `lora_rank: true` into 1 and `learning_rate: true` into 1.0, keeps `output_dir: $HOME/run` as a
folder literally named `$HOME`, and accepts text that no tokenizer can encode. Each of these is a typo, not a
setting, so each is a `Problem` naming the key and the fix.
"""

from __future__ import annotations

import os
import re
import typing
from pathlib import Path
from typing import Any, Mapping

from loraforge.errors import Problem

# Largest integer any count, size or step setting can sensibly take; beyond it torch and the tokenizers overflow.
MAX_INT = 2**31 - 1
# Keys that name a file or folder (besides the Path-typed fields, which are found from the schema).
_PATH_KEYS = ("base_model", "resume_from_checkpoint")
_ENV_VAR = re.compile(r"\$(\{?[A-Za-z_][A-Za-z0-9_]*\}?)|%([A-Za-z_][A-Za-z0-9_]*)%")  # $HOME, ${HOME}, %USERPROFILE%


def value_problems(data: Mapping[str, Any], fields: Mapping[str, Any], section: str = "") -> tuple[dict[str, Any], list[Problem]]:
    """(data with `~` expanded in paths, problems) for one section of a config.

    Args:
        data: the raw section (canonical key names).
        fields: the pydantic model's `model_fields` for that section.
        section: dotted prefix for the keys in messages (`image.`).
    """
    out = dict(data)
    problems: list[Problem] = []
    for key, value in data.items():
        field = fields.get(key) if isinstance(key, str) else None
        name = f"{section}{key}"
        if (bad := _bad_text(value)) is not None:
            problems.append(Problem(name, bad, fix="retype the text (a lone surrogate like \\ud800 or a NUL character "
                                    "is not text a tokenizer can read)"))
            continue
        if field is None:
            continue  # unknown keys are reported by pydantic with a did-you-mean
        kinds = _kinds(field.annotation)
        problem = _kind_problem(name, value, kinds, field)
        if problem is not None:
            problems.append(problem)
        elif isinstance(value, str) and (Path in kinds or key in _PATH_KEYS):
            value, problem = _path_value(name, value)
            out[key] = value
            if problem is not None:
                problems.append(problem)
    return out, problems


def _kind_problem(name: str, value: Any, kinds: set[type], field: Any) -> Problem | None:
    leaf = name.rsplit(".", 1)[-1]
    if isinstance(value, bool) and bool not in kinds and kinds & {int, float}:
        return Problem(name, "must be a number, not true/false", value=value, allowed="a number",
                       fix=f"write the number{_example(leaf, field)}")
    if kinds <= {bool, type(None)} and bool in kinds and value is not None and not isinstance(value, bool):
        return Problem(name, "must be true or false", value=value, allowed="true, false",
                       fix=f"write `{leaf}: true` or `{leaf}: false` (no quotes)")
    if (isinstance(value, int) and not isinstance(value, bool) and int in kinds and abs(value) > MAX_INT
            and not _has_upper_bound(field)):
        return Problem(name, f"is too large (at most {MAX_INT})", value=value, allowed=f"<= {MAX_INT}",
                       fix=f"use a realistic value{_example(leaf, field)}")
    return None


def _path_value(name: str, value: str) -> tuple[str, Problem | None]:
    """`~` expanded (the path everyone means); an empty path or an unexpanded environment variable refused."""
    if not value.strip():
        return value, Problem(name, "is empty", allowed="a file or folder path",
                              fix=f"write the path, or remove `{name}` to use its default")
    match = _ENV_VAR.search(value)
    if match:
        var = (match.group(1) or match.group(2)).strip("{}")
        known = os.environ.get(var)
        return value, Problem(name, f"holds the environment variable `${var}`, which loraforge does not expand "
                              "(it would become a folder literally named so)", value=value,
                              fix=f"write the path itself{f' ({known})' if known else ''}, or let the shell expand it: "
                                  f"--set {name}=\"${var}/…\"")
    return (os.path.expanduser(value) if value.startswith("~") else value), None


def _bad_text(value: Any, depth: int = 0) -> str | None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "holds a lone surrogate escape (like \\ud800): not valid Unicode text"
        return "holds a NUL character (\\0): not text" if "\x00" in value else None
    if depth < 3 and isinstance(value, (list, tuple)):
        return next((b for v in value[:1000] if (b := _bad_text(v, depth + 1))), None)
    return None


def _kinds(annotation: Any) -> set[type]:
    """The plain types an annotation admits: Union[int, None] -> {int, NoneType}, Literal[4, 8] -> {int}."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        return set().union(*(_kinds(a) for a in typing.get_args(annotation)))
    if origin is typing.Literal:
        return {type(a) for a in typing.get_args(annotation)}
    if origin is not None:
        return {origin}
    return {annotation} if isinstance(annotation, type) else set()


def _has_upper_bound(field: Any) -> bool:
    return any(getattr(m, k, None) is not None for m in field.metadata or [] for k in ("lt", "le"))


def _example(leaf: str, field: Any) -> str:
    """`, e.g. `key: default`` when the field has a numeric default, else nothing (no made-up number)."""
    d = field.default
    return f", e.g. `{leaf}: {d}`" if isinstance(d, (int, float)) and not isinstance(d, bool) else ""
