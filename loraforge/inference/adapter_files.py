"""Checks on an adapter folder and its name before anything is read from it, and the run config saved beside it.

Everything here reads only small files (JSON, YAML, directory entries); no weights, no torch.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from loraforge.errors import ModelError, Problem
from loraforge.inference.settings import BASE, PEFT_BASE

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


def resolve_adapter_path(path: str | Path, roots: Sequence[str | Path] | None = None, *, key: str = "adapter") -> Path:
    """Check an adapter dir before anything is read from it.

    With `roots`, a relative path is looked up under each root in turn and the real path (symlinks resolved)
    must lie inside one of them, so `../` or a symlink cannot reach other files. Only safetensors weights are
    accepted: `.bin` files are Python pickles that can run code when loaded.

    Raises:
        ModelError: outside the roots, missing, a full model instead of an adapter, or pickle-only weights.
    """
    resolved = _inside_roots(path, roots, key) if roots else Path(str(path)).expanduser().resolve()
    if not resolved.is_dir():
        raise ModelError([Problem(key, "adapter folder not found", value=str(path),
                                  fix="give the run's output_dir (the folder with adapter_config.json)")])
    if not (resolved / "adapter_config.json").is_file():
        if (resolved / "config.json").is_file():
            raise ModelError([Problem(key, "this folder is a complete model (a full or freeze run), not an adapter",
                                      value=str(path), fix=f"use it as the base model: --base {path}")])
        raise ModelError([Problem(key, "no adapter_config.json in this folder (not a PEFT adapter dir)", value=str(path),
                                  fix="give the run's output_dir or one of its checkpoint-N folders")])
    if not (resolved / "adapter_model.safetensors").is_file():
        pickles = sorted(p.name for p in resolved.glob("adapter_model*.bin"))
        message = ("adapter weights are a pickle (.bin), which loraforge never loads: unpickling can run code"
                   if pickles else "adapter_model.safetensors is missing")
        raise ModelError([Problem(key, message, value=str(resolved / (pickles[0] if pickles else "adapter_model.safetensors")),
                                  allowed="adapter_model.safetensors",
                                  fix="convert it once in a trusted environment: load it with PEFT and call "
                                      "save_pretrained(dir, safe_serialization=True)")])
    if roots:
        _files_inside_roots(resolved, roots, key)
    return resolved


def _files_inside_roots(folder: Path, roots: Sequence[str | Path], key: str) -> None:
    """Every file of the adapter folder (what PEFT and the tokenizer read) must resolve inside a root too: a
    symlinked `adapter_model.safetensors` pointing elsewhere would otherwise be read through the allowed folder.

    Raises:
        ModelError: naming the file and where it really points.
    """
    real_roots = [Path(r).expanduser().resolve() for r in roots]
    for entry in sorted(folder.rglob("*")):
        real = entry.resolve()
        if not any(real == r or r in real.parents for r in real_roots):
            raise ModelError([Problem(key, f"{entry.relative_to(folder)} is a link to a file outside the allowed "
                                           "adapter roots", value=str(real),
                                      allowed=", ".join(str(r) for r in real_roots),
                                      fix="copy the file into the adapter folder instead of linking it")])


def _inside_roots(path: str | Path, roots: Sequence[str | Path], key: str) -> Path:
    """The real path of `path` (relative ones looked up under each root in turn), which must lie inside a root.

    Raises:
        ModelError: every candidate lies outside the roots.
    """
    raw = Path(str(path)).expanduser()
    real_roots = [Path(r).expanduser().resolve() for r in roots]
    candidates = [raw.resolve()] if raw.is_absolute() else [(r / raw).resolve() for r in real_roots]
    inside = [c for c in candidates if any(c == r or r in c.parents for r in real_roots)]
    if not inside:
        raise ModelError([Problem(key, "adapter path is outside the allowed adapter roots", value=str(path),
                                  allowed=", ".join(str(r) for r in real_roots),
                                  fix="put the adapter under one of the roots and give its path relative to it")])
    existing = [c for c in inside if c.exists()]
    return existing[0] if existing else inside[0]


def check_adapter_name(name: str, *, key: str = "adapter") -> str:
    """Raises:
        ModelError: `base` (reserved) or characters outside [A-Za-z0-9._:-].
    """
    if name == BASE or name == PEFT_BASE:
        raise ModelError([Problem(key, "`base` is reserved for the model without adapter", value=name,
                                  fix="choose another name, e.g. the run's name")])
    if not _NAME_RE.match(name):
        raise ModelError([Problem(key, "invalid adapter name", value=name,
                                  allowed="1-64 characters from A-Z a-z 0-9 . _ : -, starting with a letter or digit")])
    return name


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The resolved loraforge config saved beside an adapter (`config.yaml`), or {} when there is none
    (a plain PEFT adapter from elsewhere). Read as plain YAML: only a few keys matter here."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}
