"""What a converted ChatGLM2/3, Baichuan2 or Qwen-1 model can do, per method and task type — for `inspect` and
the preflight. Derived from the method records (`METHODS`), the family record and the converted config; nothing
here loads weights.

Measured on the seedmodels fixtures (tests/test_native_seedmodels.py): LoRA (original or native names), prefix
tuning on the multi-query GLM (2 key/value heads of 4) with cached generation, and a SEQ_CLS LoRA train on the
converted models; `export --to original` round-trips a LoRA exactly and writes a full run in the original names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loraforge.models.native.base import NativeFamily, original_leaf_names

_NORMS = ("input_layernorm", "post_attention_layernorm", "final_layernorm", "norm", "ln_1", "ln_2", "ln_f")


@dataclass
class ConversionFacts:
    """A converted folder, described: where it came from and how the original names map onto the native ones."""

    family: str
    variant: str
    source: str
    native_architecture: str
    fused: dict[str, list[str]] = field(default_factory=dict)  # original fused leaf → native leaves
    renamed: dict[str, str] = field(default_factory=dict)  # original leaf → native leaf (or leaves, by place)
    notes: list[str] = field(default_factory=list)
    methods: dict[str, str] = field(default_factory=dict)  # method name → what it does here
    tasks: dict[str, str] = field(default_factory=dict)  # task type → what it does here


def fused_leaves(fam: NativeFamily) -> dict[str, list[str]]:
    """Original leaf names of weights that hold several native modules (query_key_value → q/k/v_proj)."""
    out: dict[str, list[str]] = {}
    for m in fam.modules:
        if m.parts > 1:
            out.setdefault(m.original.rsplit(".", 1)[-1], []).append(m.native.rsplit(".", 1)[-1])
    return out


def _kv_line(native: dict) -> str:
    heads, kv = native.get("num_attention_heads"), native.get("num_key_value_heads") or native.get("num_attention_heads")
    if kv and heads and kv != heads:
        return f"multi-query: {kv} key/value heads for {heads} query heads"
    return f"{heads} key/value heads, no multi-query"


def method_notes(fam: NativeFamily, native: dict, raw: dict) -> dict[str, str]:
    """Method name → what it does on this converted model (every registered method)."""
    from loraforge.methods import METHODS

    fused = ", ".join(fused_leaves(fam))
    blocked = fam.not_exportable(raw)
    out = {}
    for name, m in METHODS.items():
        if m.uses_target_modules:
            text = (f"trains on the native names (the original ones are translated); `export --to original` writes "
                    f"one exact LoRA per fused weight ({fused}: rank k·r for k adapted parts)")
            if blocked:
                text += f", except on {', '.join(blocked)} (stored differently by the original code)"
            if m.quantizes_base:
                text += "; the base is quantized for training only, the adapter exports like LoRA's"
            out[name] = text
        elif m.saves_adapter:  # virtual tokens / prefixes: they change the forward, not the weights
            text = "PEFT's virtual tokens on the native model; native only (the original code cannot load them)"
            if name in ("prefix", "ptuning"):
                text = (f"PEFT's prefix key/values, one per key/value head ({_kv_line(native)}), with cached "
                        "generation; native only: the original code's own `pre_seq_len` prefix encoder is not "
                        "part of the conversion")
            out[name] = text
        else:
            out[name] = ("trains the native weights; `export --to original` writes the trained model in the "
                         "original weight names and config")
    return out


def task_notes(hf_config) -> dict[str, str]:
    """Task type → what it does on this converted model (the converted architecture's Auto classes decide)."""
    from loraforge.models.registry import supported_task_types

    out = {}
    for t in supported_task_types(hf_config):
        if t.value == "CAUSAL_LM":
            out[t.value] = "the original model's task: every method, `export --to original`, `merge --layout original`"
        elif t.value == "FEATURE_EXTRACTION":
            out[t.value] = "the native model's hidden states (no head); native only"
        else:
            out[t.value] = ("a new head on the native model (trained with modules_to_save); native only — "
                            "`export --to original` refuses it")
    return out


def conversion_facts(fam: NativeFamily, record: dict, hf_config) -> ConversionFacts:
    """Everything `inspect` says about a converted folder (its `loraforge_import.json` record and config)."""
    native = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    raw = record.get("original_config") or {}
    names = original_leaf_names(fam)
    fused = fused_leaves(fam)
    facts = ConversionFacts(fam.name, record.get("variant") or fam.name, record.get("source") or "?",
                            fam.native_architecture, notes=list(record.get("notes") or []))
    for leaf, native_leaves in names.items():
        if leaf in fused:
            facts.fused[leaf] = fused[leaf]
        elif len(native_leaves) > 1:
            facts.renamed[leaf] = " / ".join(native_leaves)
        elif leaf != native_leaves[0] and leaf not in _NORMS and "embed" not in leaf + native_leaves[0]:
            facts.renamed[leaf] = native_leaves[0]
    facts.methods = method_notes(fam, native, raw)
    facts.tasks = task_notes(hf_config)
    limit = fam.seq_limit(native)
    if limit:
        facts.notes.append(f"cutoff_len ≤ {limit[0]}: {limit[1]}")
    return facts
