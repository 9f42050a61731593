"""The config side of each fine-tuning method: its default learning rate, the keys it owns, its cross-field rules.

This is the part of a method the config loader needs, so it lives here, below `loraforge.methods` (the config
package imports neither torch nor `methods/`). Each method's record in `loraforge/methods/<name>.py` holds its
`MethodOptions` from `METHOD_OPTIONS` (a test checks that both registries list the same methods, in the same
order, and that the schema's `Method` literal agrees), so everything the rest of the code asks about a method —
including these facts — is read from the one record.

What the loader derives from this table (never from a `method == ...` branch):
- `method` must be one of its names (did-you-mean on a typo);
- `learning_rate` left out → the method's `default_learning_rate`;
- a key listed in some methods' `keys` but set (to a non-default value) under another method is a mistake;
- the method's own `rules` over the raw config;
- `batching: packed` is refused with the method's `packing_unsafe` reason, when it has one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from loraforge.errors import Problem

LORA_KEYS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_bias", "target_modules", "init_lora_weights",
             "use_rslora", "use_dora", "layers_to_transform")
QUANT_KEYS = ("quant_bits", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype")
FREEZE_KEYS = ("freeze_trainable_layers", "freeze_layer_indices", "freeze_trainable_modules",
               "freeze_train_embeddings", "freeze_train_lm_head")
# Virtual tokens are shared by every example of a packed row, so prompt-learning methods never pack.
VIRTUAL_TOKENS_SHARED = "virtual tokens would be shared by every example in a packed row"


def no_rules(raw: Mapping[str, Any]) -> list[Problem]:
    """A method without cross-field rules of its own."""
    return []


@dataclass(frozen=True)
class MethodOptions:
    """What the config loader knows about one method.

    Attributes:
        name: the `method:` value.
        default_learning_rate: used when the config leaves `learning_rate` out (each method's usual peak rate).
        keys: config keys that only mean something for this method (and the other methods that list them).
        rules: the method's own cross-field rules, on the raw (aliased, not yet validated) config dict.
        packing_unsafe: why rows must not be packed with this method (None: packing is safe).
        packages: optional packages the method itself imports (`loraforge train` hides the unused ones).
    """

    name: str
    default_learning_rate: float
    keys: tuple[str, ...] = ()
    rules: Callable[[Mapping[str, Any]], list[Problem]] = no_rules
    packing_unsafe: str | None = None
    packages: tuple[str, ...] = ()


def _qlora_rules(d: Mapping[str, Any]) -> list[Problem]:
    """The 4-bit keys mean nothing for an 8-bit base."""
    if d.get("quant_bits") != 8:
        return []
    return [Problem(key, "only applies to 4-bit quantization, but quant_bits is 8", value=d[key],
                    allowed="quant_bits: 4", fix=f"remove `{key}` or set `quant_bits: 4`")
            for key in QUANT_KEYS[1:] if key in d]


def _prompt_rules(d: Mapping[str, Any]) -> list[Problem]:
    """Text initialization needs its text; text without text initialization would be ignored."""
    problems: list[Problem] = []
    if d.get("prompt_tuning_init") == "text" and not d.get("prompt_tuning_init_text"):
        problems.append(Problem("prompt_tuning_init_text", "is required when prompt_tuning_init is `text`",
                                allowed="a non-empty string",
                                fix="set prompt_tuning_init_text: \"Answer the medical question:\""))
    if d.get("prompt_tuning_init_text") and d.get("prompt_tuning_init", "random") != "text":
        problems.append(Problem("prompt_tuning_init", "prompt_tuning_init_text is set but would be ignored",
                                value=d.get("prompt_tuning_init", "random"), allowed="text",
                                fix="set `prompt_tuning_init: text` (or remove prompt_tuning_init_text)"))
    return problems


def _freeze_rules(d: Mapping[str, Any]) -> list[Problem]:
    """One way of choosing the trained blocks at a time, and something must train."""
    problems: list[Problem] = []
    chosen = [k for k in ("freeze_trainable_layers", "freeze_layer_indices") if d.get(k) is not None]
    if len(chosen) == 2:
        problems.append(Problem("freeze_layer_indices", "freeze_trainable_layers and freeze_layer_indices both "
                                "choose the trained blocks", value=d["freeze_layer_indices"],
                                allowed="one of freeze_trainable_layers, freeze_layer_indices",
                                fix="keep one: the last N blocks (freeze_trainable_layers) or exact indices"))
    if d.get("freeze_trainable_layers") == 0 and not any(d.get(k) for k in FREEZE_KEYS[2:]):
        problems.append(Problem("freeze_trainable_layers", "0 blocks and nothing else trainable: nothing would train",
                                value=0, allowed="a non-zero integer, or freeze_trainable_modules / "
                                "freeze_train_embeddings / freeze_train_lm_head",
                                fix="set e.g. `freeze_trainable_layers: 2` (the last two blocks)"))
    return problems


LORA = MethodOptions("lora", 2e-4, LORA_KEYS)
QLORA = MethodOptions("qlora", 2e-4, LORA_KEYS + QUANT_KEYS, rules=_qlora_rules, packages=("bitsandbytes",))
PREFIX = MethodOptions("prefix", 1e-2, ("num_virtual_tokens", "prefix_projection", "encoder_hidden_size"),
                       packing_unsafe=VIRTUAL_TOKENS_SHARED)
PTUNING = MethodOptions("ptuning", 1e-2, ("num_virtual_tokens", "encoder_hidden_size",
                                          "encoder_reparameterization_type"), packing_unsafe=VIRTUAL_TOKENS_SHARED)
PROMPT = MethodOptions("prompt", 1e-2, ("num_virtual_tokens", "prompt_tuning_init", "prompt_tuning_init_text"),
                       rules=_prompt_rules, packing_unsafe=VIRTUAL_TOKENS_SHARED)
FREEZE = MethodOptions("freeze", 5e-5, FREEZE_KEYS, rules=_freeze_rules)
FULL = MethodOptions("full", 1e-5)

# name → options, in the order errors and help list the methods.
METHOD_OPTIONS: dict[str, MethodOptions] = {o.name: o for o in (LORA, QLORA, PREFIX, PTUNING, PROMPT, FREEZE, FULL)}


def key_owners(options: Mapping[str, MethodOptions] | None = None) -> dict[str, tuple[str, ...]]:
    """config key → the methods it applies to (only keys some method owns), in `METHOD_OPTIONS` order."""
    owners: dict[str, list[str]] = {}
    for opt in (METHOD_OPTIONS if options is None else options).values():
        for key in opt.keys:
            owners.setdefault(key, []).append(opt.name)
    return {key: tuple(names) for key, names in owners.items()}
