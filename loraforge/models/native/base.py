"""The record a converted family provides, and the name map every conversion direction is built from.

A family module (`chatglm.py`, `baichuan.py`, `qwen1.py`) describes its checkpoints once:
* `claims(raw)`: this config.json is one of its checkpoints (including shapes it refuses);
* `refusal(raw, src)`: why this one has no native equivalent (None when it converts);
* `native_config(raw, src)`: the native config.json;
* `MODULES`: native module path ⇄ original module path (with the part of a fused original weight), from which
  the weight conversion, the reverse conversion (`merge --layout original`), the adapter export
  (`export --to original`) and the `target_modules` translation are all derived;
* `tokenizer(src, out, raw, native)`: the fast tokenizer with its chat template.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ModuleMap:
    """One native module and where its weights live in the original checkpoint.

    `{i}` stands for the layer number. `part` / `parts`: the native module is rows `part` of a fused original
    weight split into `parts` (query/key/value); `part_sizes(native_cfg)` gives the rows of each part.
    """

    native: str
    original: str
    part: int = 0
    parts: int = 1


@dataclass(frozen=True)
class NativeFamily:
    name: str  # "chatglm"
    native_architecture: str  # "GlmForCausalLM"
    claims: Callable[[dict], bool]
    refusal: Callable[[dict, Path], str | None]
    variant: Callable[[dict, Path], str]
    native_config: Callable[[dict, Path], dict]
    tokenizer: Callable[[Path, Path, dict, dict], None]
    generation_config: Callable[[dict, Path, dict], dict]
    modules: tuple[ModuleMap, ...]
    part_sizes: Callable[[dict], list[int]]
    # original tensor names that carry no weights of the native model (rotary caches)
    skip: tuple[str, ...] = ()
    # (native tensor name, tensor, raw config) → tensor, for the few weights stored differently (NormHead)
    transform: Callable[[str, Any, dict], Any] | None = None
    # native leaf names whose weights are not stored as-is in the original (adapters on them cannot go back)
    not_exportable: Callable[[dict], tuple[str, ...]] = lambda raw: ()
    notes: Callable[[dict], list[str]] = lambda raw: []
    seq_limit: Callable[[dict], tuple[int, str] | None] = lambda native: None
    extra: dict = field(default_factory=dict)


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


def _fill(template: str, i: str | None) -> str:
    return template.replace("{i}", i) if i is not None else template


def to_native_module(fam: NativeFamily, original: str) -> list[tuple[str, int, int]]:
    """Native modules (path, part, parts) stored in `original` (a module path of the original checkpoint)."""
    out = []
    for m in fam.modules:
        hit = _pattern(m.original).match(original)
        if hit:
            out.append((_fill(m.native, hit.groupdict().get("i")), m.part, m.parts))
    return sorted(out, key=lambda x: x[1])


def to_original_module(fam: NativeFamily, native: str) -> tuple[str, int, int] | None:
    """(original module path, part, parts) holding the native module `native`, or None."""
    for m in fam.modules:
        hit = _pattern(m.native).match(native)
        if hit:
            return _fill(m.original, hit.groupdict().get("i")), m.part, m.parts
    return None


def _split_param(name: str) -> tuple[str, str]:
    module, _, param = name.rpartition(".")
    return module, param


def convert_tensor(fam: NativeFamily, name: str, tensor: torch.Tensor, raw: dict,
                   native: dict) -> list[tuple[str, torch.Tensor]]:
    """The native tensors stored in the original tensor `name` ([] for a skipped buffer).

    Raises:
        KeyError: `name` is not a weight this family knows (the converter then refuses the checkpoint).
    """
    if any(re.search(s, name) for s in fam.skip):
        return []
    module, param = _split_param(name)
    targets = to_native_module(fam, module)
    if not targets:
        raise KeyError(name)
    if len(targets) == 1 and targets[0][2] == 1:
        pieces = [tensor]
    else:
        sizes = fam.part_sizes(native)
        if sum(sizes) != tensor.shape[0]:
            raise ValueError(f"{name}: {tensor.shape[0]} rows, expected {' + '.join(map(str, sizes))}")
        pieces = [p.clone() for p in tensor.split(sizes, dim=0)]
        if len(pieces) != len(targets):
            raise ValueError(f"{name}: {len(pieces)} parts, the family maps {len(targets)}")
    out = []
    for (nmodule, _, _), t in zip(targets, pieces):
        nname = f"{nmodule}.{param}"
        if fam.transform is not None:
            t = fam.transform(nname, t, raw)
        out.append((nname, t))
    return out


def original_leaf_names(fam: NativeFamily) -> dict[str, list[str]]:
    """Original leaf name → the native leaf names it becomes (`query_key_value` → q_proj, k_proj, v_proj)."""
    out: dict[str, list[str]] = {}
    for m in fam.modules:
        leaf, nleaf = m.original.rsplit(".", 1)[-1], m.native.rsplit(".", 1)[-1]
        if nleaf not in out.setdefault(leaf, []):
            out[leaf].append(nleaf)
    return out
