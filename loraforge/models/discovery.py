"""The real module names of a model, found by building it on the meta device, and target_modules checks.

Building from the config on the meta device allocates no memory (a 7B LLaMA builds in well under a second), so
`target_modules` is checked against the exact names PEFT will see, for any model size, before weights load.

PEFT matching (peft 0.21, `check_target_module_exists`): a string is a regex that must `fullmatch` a module's
full name; a list entry matches a module whose full name equals it or ends with `.<entry>`. If at least one
entry of a list matches, PEFT silently ignores the others (FINDINGS.md trap 3) — so here every entry must match.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Sequence

from loraforge.config.schema import TaskType
from loraforge.errors import ModelError, Problem, did_you_mean
# load_hf_config, is_remote_placeholder and remote_code_problem are imported from here by preflight, estimate,
# inspect and methods; they live in hf_config, which loader imports too, so the two modules need no cycle.
from loraforge.models.hf_config import (AUTO_CLASSES, is_remote_placeholder, load_hf_config,  # noqa: F401
                                        remote_code_problem)
from loraforge.models.registry import Family, family_for

if TYPE_CHECKING:
    from torch import nn

Group = Literal["attention", "mlp", "head", "other"]
ALL_LINEAR = "all-linear"
# the names a string target_modules may be instead of a regex; what each adapts: models/targets.py
PRESET_NAMES = ("all", "attention", "qv", "mlp", ALL_LINEAR)


def is_preset(value: Any) -> bool:
    """A preset loraforge resolves to names itself (`all-linear` is PEFT's own and goes to PEFT as is)."""
    return isinstance(value, str) and value.lower() in PRESET_NAMES and value.lower() != ALL_LINEAR


@dataclass(frozen=True)
class LinearInfo:
    """One linear layer of a model.

    Attributes:
        name: full module name (`model.layers.0.self_attn.q_proj`).
        leaf: last name component (`q_proj`) — what a target_modules list usually names.
        in_features, out_features: the layer's shape (for Conv1D: nx, nf).
        cls_name: class name (`Linear`, `Conv1D`, `FalconLinear`, `Linear4bit`…).
        group: attention, mlp, head (LM head / classifier) or other.
    """

    name: str
    leaf: str
    in_features: int
    out_features: int
    cls_name: str
    group: Group

    @property
    def suffix(self) -> str:
        """The name below the last layer index (`self_attn.q_proj`): the same for every layer of a stack."""
        parts = self.name.split(".")
        idx = [i for i, p in enumerate(parts) if p.isdigit()]
        return ".".join(parts[idx[-1] + 1:]) if idx else self.name


# ----------------------------------------------------------------------------------------------- config + build

def meta_model(hf_config: Any, task_type: TaskType = TaskType.CAUSAL_LM, trust_remote_code: bool = False) -> "nn.Module":
    """Build the model for `task_type` from its config on the meta device: every module and shape, no memory.

    Raises:
        ModelError: the model's remote code is unavailable, or transformers has no class for this task type.
    """
    import torch
    import transformers

    if is_remote_placeholder(hf_config):
        raise ModelError([remote_code_problem(hf_config, trust_remote_code)])
    auto_cls = getattr(transformers, AUTO_CLASSES[task_type])
    try:
        with torch.device("meta"):
            return auto_cls.from_config(hf_config, trust_remote_code=trust_remote_code)
    except ValueError as err:
        raise ModelError([Problem("task_type", f"cannot build `{hf_config.model_type}` for {task_type.value}: "
                                  f"{str(err).splitlines()[0]}", value=task_type.value)]) from None


def try_meta_model(hf_config: Any, task_type: TaskType = TaskType.CAUSAL_LM,
                   trust_remote_code: bool = False) -> "nn.Module | None":
    """`meta_model`, or None when the config is a remote-code placeholder (checks then use the registry)."""
    if is_remote_placeholder(hf_config):
        return None
    return meta_model(hf_config, task_type, trust_remote_code)


# ---------------------------------------------------------------------------------------------- linear layers

_HEAD_PARTS = {"lm_head", "embed_out", "score", "classifier", "qa_outputs", "pooler", "classification_head", "cls",
               "output_layer", "vocab_projector", "vocab_transform", "pre_classifier"}
_MLP_PARTS = ("mlp", "ffn", "feed_forward", "densereludense", "intermediate", "experts")
_MLP_LEAVES = {"fc1", "fc2", "c_fc", "dense_h_to_4h", "dense_4h_to_h", "gate_proj", "up_proj", "down_proj",
               "gate_up_proj", "w1", "w2", "w3", "wi", "wi_0", "wi_1", "lin1", "lin2", "fc_in", "fc_out"}


def _group(name: str) -> Group:
    """attention / mlp / head / other, from the module's path (family-agnostic naming conventions)."""
    parts = name.split(".")
    low = [p.lower() for p in parts]
    if any(p in _HEAD_PARTS for p in low) or name in ("output",):  # InternLM2's LM head is `output`
        return "head"
    if any("attn" in p or "attention" in p for p in low):
        return "attention"
    if any(any(m in p for m in _MLP_PARTS) for p in low) or low[-1] in _MLP_LEAVES:
        return "mlp"
    if len(low) >= 2 and low[-2] == "output" and low[-1] == "dense":  # BERT: layer.N.output.dense (FFN down)
        return "mlp"
    return "other"


def _shape(module: Any) -> tuple[int, int] | None:
    cls = type(module).__name__
    if cls == "Conv1D" and hasattr(module, "nx"):  # transformers' GPT-2 Conv1D: weight is (in, out)
        return int(module.nx), int(module.nf)
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    return None


def linear_modules(model: "nn.Module") -> list[LinearInfo]:
    """Every linear layer LoRA can adapt: nn.Linear and its subclasses (FalconLinear, bitsandbytes Linear4bit /
    Linear8bitLt), transformers' Conv1D; for an already-wrapped PEFT model, the wrapped layer (not lora_A/B)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    out: list[LinearInfo] = []
    wrapped: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue  # inside a PEFT layer: base_layer, lora_A, lora_B…
        if hasattr(module, "base_layer") and hasattr(module, "active_adapters"):
            wrapped.append(name)
            module = module.get_base_layer()
        if isinstance(module, (nn.Linear, Conv1D)) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            shape = _shape(module)
            if shape is None:
                continue
            out.append(LinearInfo(name, name.rsplit(".", 1)[-1], shape[0], shape[1], type(module).__name__,
                                  _group(name)))
    return out


def _adaptable_names(model: "nn.Module") -> list[str]:
    """Full names of modules LoRA supports besides linear layers (embeddings, convolutions, MultiheadAttention)."""
    from torch import nn

    kinds = (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)
    return [n for n, m in model.named_modules() if isinstance(m, kinds)]


# ------------------------------------------------------------------------------------------- name equivalents

# The same role under each family's name. A name may have more than one role (T5's `wo` is the FFN output;
# InternLM2's `wo` the attention output), so suggestions use the layer's group to pick among candidates.
_ROLES: dict[str, tuple[str, ...]] = {
    "q": ("q_proj", "q", "query", "query_proj", "q_lin", "wq", "to_q"),
    "k": ("k_proj", "k", "key", "key_proj", "k_lin", "wk", "to_k"),
    "v": ("v_proj", "v", "value", "value_proj", "v_lin", "wv", "to_v"),
    "qkv": ("query_key_value", "c_attn", "W_pack", "qkv_proj", "Wqkv", "qkv", "wqkv", "in_proj"),
    "o": ("o_proj", "o", "out_proj", "out_lin", "dense", "c_proj", "wo", "to_out", "attention.output.dense"),
    "up": ("up_proj", "gate_proj", "gate_up_proj", "fc1", "dense_h_to_4h", "c_fc", "wi", "wi_0", "wi_1", "w1", "w3",
           "lin1", "fc_in", "intermediate.dense"),
    "down": ("down_proj", "fc2", "dense_4h_to_h", "c_proj", "wo", "w2", "lin2", "fc_out", "output.dense"),
}
_ATTN_ROLES = {"q", "k", "v", "qkv", "o"}
_ROLE_WORDS = {"q": "query", "k": "key", "v": "value", "qkv": "fused query/key/value", "o": "attention output",
               "up": "MLP input", "down": "MLP output"}


def _roles_of_name(name: str) -> set[str]:
    """Roles a user-written target name means (`query_proj` → {q}); matched case-insensitively."""
    low = name.lower()
    return {role for role, names in _ROLES.items() if low in (n.lower() for n in names)}


def _roles_of_layer(info: LinearInfo) -> set[str]:
    """Roles of a real layer: its name's roles, narrowed by where it sits (attention vs MLP)."""
    parts = info.name.split(".")
    roles = set().union(*(_roles_of_name(".".join(parts[-n:])) for n in (1, 2, 3)))
    if info.group == "attention":
        return roles & _ATTN_ROLES
    if info.group == "mlp":
        return roles - _ATTN_ROLES
    return set()


def closest_modules(entry: str, layers: Sequence[LinearInfo], leaf_names: Sequence[str] | None = None) -> list[str]:
    """Real leaf names that do the job `entry` names in another family, best first.

    `q`/`v` (T5) on LLaMA → `q_proj`/`v_proj`; `query_proj` on a fused-QKV model → `query_key_value`;
    `query_key_value` on LLaMA → `q_proj`, `k_proj`, `v_proj`. Falls back to string similarity.
    """
    leaves = list(dict.fromkeys(leaf_names if leaf_names is not None else [i.leaf for i in layers]))
    wanted = _roles_of_name(entry)
    if wanted and layers:
        by_role: dict[str, list[str]] = {}
        for info in layers:
            for role in _roles_of_layer(info):
                by_role.setdefault(role, [])
                if info.leaf not in by_role[role]:
                    by_role[role].append(info.leaf)
        hits: list[str] = []
        for role in sorted(wanted):
            hits += by_role.get(role, [])
        if not hits and wanted & {"q", "k", "v"}:
            hits = by_role.get("qkv", [])  # the model fuses q, k and v into one layer
        if not hits and "qkv" in wanted:
            hits = [n for r in ("q", "k", "v") for n in by_role.get(r, [])]  # the model keeps them separate
        if hits:
            return list(dict.fromkeys(hits))
    if wanted and not layers:  # registry fallback: names only, no groups
        cands = [n for n in leaves if _roles_of_name(n) & (wanted | ({"qkv"} if wanted & {"q", "k", "v"} else set()))]
        if cands:
            return cands
    return did_you_mean(entry, leaves, n=3, cutoff=0.5)


# ------------------------------------------------------------------------------------------------- the checks

def _family_fallback(hf_config: Any) -> tuple[Family | None, list[str]]:
    fam = family_for(hf_config)
    return fam, list(fam.remote_code_modules) if fam else []


def _matches(entry: str, names: Sequence[str]) -> list[str]:
    """Names PEFT would match for one list entry: equal, or ending with `.entry`."""
    return [n for n in names if n == entry or n.endswith("." + entry)]


def check_target_modules(hf_config: Any, model: "nn.Module | None",
                         target_modules: list[str] | tuple[str, ...] | str | None) -> list[Problem]:
    """Problems with `target_modules` against the model's real layers; empty when every name matches.

    Args:
        hf_config: the model's config.
        model: the model (meta-device is enough). None for a remote-code checkpoint whose code is unavailable:
            the names are then checked against the registry's list for its family (said in each problem).
        target_modules: None (every linear layer of the blocks), a preset (`attention`, `qv`, `mlp`,
            `all-linear`), a regex string, or a list of names.
    """
    if target_modules is None or is_preset(target_modules):
        return []
    from loraforge.models.native import original_names_hint, translate_targets

    target_modules, _ = translate_targets(hf_config, target_modules)  # a converted model's original names
    known = _known_names(hf_config, model)
    if known is None:
        return []  # nothing to check against; building/loading the model reports why it is unavailable
    layers, linear_names, leaf_names, other_names, fallback_note = known
    hint = original_names_hint(hf_config)
    if hint:
        fallback_note += f" (converted from the original checkpoint, whose names also work: {hint})"
    allowed = ", ".join(leaf_names)

    if isinstance(target_modules, str):
        return _check_regex(target_modules, linear_names + other_names, leaf_names, layers, allowed, fallback_note,
                            by_leaf=model is None)
    if not isinstance(target_modules, (list, tuple)):
        return [Problem("target_modules", "must be a list of module names, a regex string or `all-linear`",
                        value=target_modules, allowed=allowed)]
    if not target_modules:
        return [Problem("target_modules", "an empty list adapts nothing", value=[], allowed=allowed,
                        fix="leave target_modules out to adapt every linear layer of the blocks")]

    problems: list[Problem] = []
    corrected: list[str] = []
    missed: list[tuple[int, str, list[str]]] = []
    for i, entry in enumerate(target_modules):
        key = f"target_modules[{i}]"
        if not isinstance(entry, str):
            problems.append(Problem(key, "must be a module name (a string)", value=entry, allowed=allowed))
            continue
        if entry.lower() in PRESET_NAMES:
            problems.append(Problem(key, f"`{entry}` is a preset: it only works as the whole value, not inside a list",
                                    value=entry, fix=f"write `target_modules: {entry.lower()}`"))
            continue
        if model is None:
            hit = entry in leaf_names or any(entry.endswith("." + n) for n in leaf_names)
        else:
            hit = bool(_matches(entry, linear_names + other_names))
        if hit:
            corrected.append(entry)
            continue
        if model is not None and _matches(entry, [n for n, _ in model.named_modules()]):
            inner = _inner_leaves(model, entry, layers)
            problems.append(Problem(key, f"`{entry}` is not a layer LoRA can adapt (it is a "
                                    f"{_class_of(model, entry)})", value=entry, allowed=allowed,
                                    fix=f"name its linear layers instead: {', '.join(inner)}" if inner else
                                    "LoRA adapts linear layers (see allowed); to train this module in full, "
                                    "list it in modules_to_save"))
            corrected += inner
            continue
        near = closest_modules(entry, layers, leaf_names)
        missed.append((i, entry, near))
        corrected += near[:1] if not (_roles_of_name(entry) & {"qkv"}) else near
    fixed_list = "[" + ", ".join(dict.fromkeys(corrected)) + "]"
    regex_names = linear_names if model is not None else []
    return problems + [_missed_problem(i, entry, near, fixed_list, regex_names, allowed, fallback_note)
                       for i, entry, near in missed]


def _known_names(hf_config: Any, model: "nn.Module | None"
                 ) -> tuple[list[LinearInfo], list[str], list[str], list[str], str] | None:
    """What target_modules entries are checked against: (linear layers, their full names, their leaf names,
    other adaptable module names, a note for the problems), or None when nothing is known.

    Without a model (remote code unavailable) only the registry's leaf names of the family are known.
    """
    if model is None:
        fam, leaf_names = _family_fallback(hf_config)
        if not leaf_names:
            return None
        note = (f" (checked against loraforge's registry of {fam.name} module names, because the model's "
                "remote code is not available here)")
        return [], leaf_names, leaf_names, [], note
    layers = linear_modules(model)
    return (layers, [i.name for i in layers], list(dict.fromkeys(i.leaf for i in layers)), _adaptable_names(model),
            "")


def _missed_problem(i: int, entry: str, near: list[str], fixed_list: str, linear_names: list[str], allowed: str,
                    fallback_note: str) -> Problem:
    """The problem of a list entry that names no module: a regex given as a list entry, or the nearest names
    (with the whole corrected list as the fix)."""
    if _regex_hits(entry, linear_names):
        return Problem(f"target_modules[{i}]",
                       f"list entries are module names, not regular expressions{fallback_note}", value=entry,
                       allowed=allowed,
                       fix=f"give the regex as the whole value (`target_modules: '{entry}'`), or list names")
    what = sorted(_roles_of_name(entry))
    role = f" (the {_ROLE_WORDS[what[0]]} projection)" if len(what) == 1 else ""
    if near:
        fix = f"use `{near[0]}`" + (f" (or {', '.join(f'`{n}`' for n in near[1:])})" if len(near) > 1 else "")
        fix += f" instead of `{entry}`{role}; e.g. target_modules: {fixed_list}"
    else:
        fix = "pick names from the allowed list, or use `all-linear`"
    return Problem(f"target_modules[{i}]", f"no module of this model is named `{entry}`{fallback_note}",
                   value=entry, allowed=allowed, fix=fix)


def _regex_hits(entry: str, names: Sequence[str]) -> bool:
    """True when `entry` looks like a regex (has metacharacters) and, used as one, would match some module."""
    if not re.search(r"[*+?\[\]()|\\^$]", entry):
        return False
    try:
        rx = re.compile(entry)
    except re.error:
        return False
    return any(rx.fullmatch(n) or rx.search(n) for n in names)


def _check_regex(pattern: str, names: list[str], leaf_names: list[str], layers: list[LinearInfo], allowed: str,
                 note: str, by_leaf: bool) -> list[Problem]:
    if pattern.lower() == ALL_LINEAR:
        return []
    try:
        rx = re.compile(pattern)
    except re.error as err:
        return [Problem("target_modules", f"a string is a regular expression, and this one is invalid ({err})",
                        value=pattern, allowed=allowed, fix="write a list of names instead, e.g. [q_proj, v_proj]")]
    if by_leaf:  # registry fallback: we only know leaf names, so accept a pattern that can match `...<leaf>`
        if any(rx.fullmatch(n) or rx.fullmatch("x." + n) for n in leaf_names):
            return []
    elif any(rx.fullmatch(n) for n in names):
        return []
    if pattern in leaf_names or _matches(pattern, names):
        fix = (f"a string is a regex matched against the FULL module name (e.g. `{names[0] if names else pattern}`);"
               f" write a list `[{pattern}]` or the regex `.*\\.{pattern}`")
    else:
        near = closest_modules(pattern, layers, leaf_names)
        fix = f"did you mean `{near[0]}`? as a list: [{', '.join(near)}]" if near else "use a list of names from allowed"
    return [Problem("target_modules", f"the regex matches no module of this model{note}", value=pattern,
                    allowed=allowed, fix=fix)]


def _class_of(model: "nn.Module", entry: str) -> str:
    for name, module in model.named_modules():
        if name == entry or name.endswith("." + entry):
            return type(module).__name__
    return "module"


def _inner_leaves(model: "nn.Module", entry: str, layers: list[LinearInfo]) -> list[str]:
    """Leaf names of the linear layers inside the modules `entry` names (for `self_attn` → q_proj, k_proj…)."""
    prefixes = [n for n, _ in model.named_modules() if n == entry or n.endswith("." + entry)]
    return list(dict.fromkeys(i.leaf for i in layers if any(i.name.startswith(p + ".") for p in prefixes)))
