"""Which layers LoRA adapts: the default (every linear layer of the transformer blocks) and the named presets.

Left out, `target_modules` means every linear layer inside the blocks — attention and MLP, fused layers included
(`query_key_value`, `W_pack`, `c_attn`, `dense_h_to_4h`…), never the LM head, a classifier or the embeddings.
The QLoRA paper (Dettmers et al. 2023, §4) found LoRA on every linear layer of the blocks necessary to match
full fine-tuning; attention-only targets learn far less (a persona run on SmolLM2: 0/12 held-out questions
with q/v, 12/12 with every linear layer). LLaMA-Factory, axolotl and unsloth default to the same.

Presets (a string `target_modules` that is one of these names; any other string is a PEFT regex):
`all` (the default), `attention`, `qv`, `mlp`, and PEFT's own `all-linear`. Names are resolved against the real model (built on the
meta device) into the shortest list PEFT matches exactly; without the model (remote code unavailable) the
family registry's names are used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loraforge.errors import ModelError, Problem
from loraforge.models.discovery import (_ATTN_ROLES, ALL_LINEAR, PRESET_NAMES, LinearInfo, _roles_of_layer,
                                        _roles_of_name, check_target_modules, is_preset, linear_modules)
from loraforge.models.registry import family_for

if TYPE_CHECKING:
    from torch import nn

# name -> what it adapts (config-help shows these lines)
PRESETS: dict[str, str] = {
    "all": "the default written out: every linear layer of the transformer blocks (LLaMA-Factory's "
           "`lora_target: all`)",
    "attention": "every attention projection of the blocks (q, k, v, o, or the fused QKV layer and its output)",
    "qv": "only the query and value projections (or the fused QKV layer): the LoRA paper's choice, the least "
          "memory, and the least learned",
    "mlp": "every MLP (feed-forward) linear layer of the blocks",
    ALL_LINEAR: "PEFT's own: every linear layer except the output layer (also linears outside the blocks)",
}
_REGISTRY_HEADS = {"lm_head", "output_layer", "output", "embed_out"}


def in_blocks(info: LinearInfo) -> bool:
    """A linear layer of the repeated transformer blocks (its name has a layer index), not a head."""
    return info.group != "head" and any(p.isdigit() for p in info.name.split("."))


def default_target_modules(hf_config: Any, model: nn.Module | None) -> list[str]:
    """Every linear layer of the blocks, as the shortest names PEFT matches exactly (`[q_proj, …, down_proj]`)."""
    if model is None:
        return _registry_names(hf_config, None)
    layers = linear_modules(model)
    return peft_names([i for i in layers if in_blocks(i)], model) or [ALL_LINEAR]


def preset_targets(hf_config: Any, model: nn.Module | None, preset: str) -> list[str]:
    """The names a preset (`attention`, `qv`, `mlp`) stands for on this model."""
    preset = preset.lower()
    if preset == "all":
        return default_target_modules(hf_config, model)
    if model is None:
        return _registry_names(hf_config, preset)
    layers = [i for i in linear_modules(model) if in_blocks(i)]
    if preset == "qv":
        chosen = _qv_layers(hf_config, layers)
    else:
        chosen = [i for i in layers if i.group == preset]
    return peft_names(chosen, model)


def _qv_layers(hf_config: Any, layers: list[LinearInfo]) -> list[LinearInfo]:
    """The family's query/value names when the model has them; else PEFT's per-model_type default; else the
    layers whose role is query/value (or fused QKV)."""
    leaves = {i.leaf for i in layers}
    fam = family_for(hf_config)
    names: list[str] | None = None
    if fam and set(fam.qv_targets) <= leaves:
        names = list(fam.qv_targets)
    else:
        try:
            from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_defaults

            peft_default = peft_defaults.get(getattr(hf_config, "model_type", ""))
            if isinstance(peft_default, list) and set(peft_default) <= leaves:
                names = list(peft_default)
        except ImportError:
            pass
    if names is not None:
        return [i for i in layers if i.leaf in names]
    attn = [i for i in layers if i.group == "attention"]
    for roles in ({"q", "v"}, {"qkv"}):
        hits = [i for i in attn if _roles_of_layer(i) & roles]
        if hits:
            return hits
    return attn


def _registry_names(hf_config: Any, preset: str | None) -> list[str]:
    """Without a model: the family registry's names (remote-code modules, minus the output layer)."""
    fam = family_for(hf_config)
    if fam is None:
        return []
    modules = [n for n in fam.remote_code_modules if n not in _REGISTRY_HEADS] or list(fam.qv_targets)
    if preset is None:
        return modules
    if preset == "qv":
        return list(fam.qv_targets)
    # a name with both roles (Qwen's `c_proj` is the attention output and the MLP output) belongs to neither
    if preset == "attention":
        return [n for n in modules if n in fam.qv_targets or (_roles_of_name(n) and _roles_of_name(n) <= _ATTN_ROLES)]
    return [n for n in modules if _roles_of_name(n) and not _roles_of_name(n) & _ATTN_ROLES]


def peft_names(chosen: list[LinearInfo], model: nn.Module) -> list[str]:
    """The shortest names that make PEFT adapt exactly `chosen`: the leaf (`q_proj`) when no other module ends
    with it, else more of the path (BERT: `output.dense`, since the pooler has a `dense` too)."""
    wanted = {i.name for i in chosen}
    all_names = [n for n, _ in model.named_modules()]
    out: list[str] = []
    for suffix in dict.fromkeys(i.suffix for i in chosen):
        parts = suffix.split(".")
        for k in range(1, len(parts) + 1):
            cand = ".".join(parts[-k:])
            if all(n in wanted for n in all_names if n == cand or n.endswith("." + cand)):
                break
        else:  # the same path also exists outside the chosen layers: name each layer in full
            out += [i.name for i in chosen if i.suffix == suffix]
            continue
        if cand not in out:
            out.append(cand)
    return out


def attention_only_advice(model: nn.Module | None, targets: list[str] | str) -> str | None:
    """One advisory line when the resolved targets adapt only attention layers (a choice, not an error)."""
    if model is None or targets == ALL_LINEAR:
        return None
    import re

    layers = [i for i in linear_modules(model) if in_blocks(i)]
    if isinstance(targets, str):  # a PEFT regex: full match of the module name
        adapted = [i for i in layers if re.fullmatch(targets, i.name)]
    else:
        adapted = [i for i in layers if any(i.name == t or i.name.endswith("." + t) for t in targets)]
    if not adapted or any(i.group != "attention" for i in adapted) or not any(i.group == "mlp" for i in layers):
        return None
    return ("advice: target_modules adapts attention layers only; LoRA on attention alone learns much less "
            "(QLoRA paper §4; a persona run on SmolLM2: 0/12 held-out answers vs 12/12). Leave target_modules "
            "out to adapt every linear layer of the blocks (or set `target_modules: all-linear`)")


def resolve_target_modules(hf_config: Any, model: "nn.Module | None",
                           target_modules: list[str] | tuple[str, ...] | str | None) -> list[str] | str:
    """What to pass to PEFT's `target_modules`: the default or a preset resolved to names, else the checked value.

    Raises:
        ModelError: any entry matches no module (see check_target_modules).
    """
    problems = check_target_modules(hf_config, model, target_modules)
    if problems:
        raise ModelError(problems)
    if target_modules is not None and not is_preset(target_modules):
        from loraforge.models.native import translate_targets

        target_modules, _ = translate_targets(hf_config, target_modules)  # a converted model's original names
    if target_modules is None:
        default = default_target_modules(hf_config, model)
        return ALL_LINEAR if default == [ALL_LINEAR] else default
    if is_preset(target_modules):
        names = preset_targets(hf_config, model, target_modules)
        if not names:
            raise ModelError([Problem("target_modules", f"this model has no layer the `{target_modules}` preset "
                                      "adapts", value=target_modules, allowed=", ".join(PRESET_NAMES),
                                      fix="leave target_modules out, or list names from `loraforge inspect MODEL`")])
        return names
    if isinstance(target_modules, str):
        return ALL_LINEAR if target_modules.lower() == ALL_LINEAR else target_modules
    return list(target_modules)
