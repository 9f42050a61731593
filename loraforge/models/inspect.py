"""`loraforge inspect MODEL`: what a model is and which names target_modules can use, from its config alone.

The model is built on the meta device, so this is instant for a 70B config and works when only config.json
is present. For a remote-code checkpoint whose code cannot run, the registry's module names are shown instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraforge.config.schema import TaskType
from loraforge.models.discovery import LinearInfo

_LORA_R = 8  # rank used for the "LoRA adds N parameters" line (the config default)


@dataclass(frozen=True)
class LinearGroup:
    """Linear layers that share a name below the layer index (`self_attn.q_proj`) and a shape."""

    group: str
    suffix: str
    leaf: str
    in_features: int
    out_features: int
    cls_name: str
    count: int


@dataclass
class InspectReport:
    """Facts about a model, as `format_inspect` prints them.

    `total_params` and the layer lists are None/empty when the model could not be built (remote code).
    """

    source: str
    model_dir: Path
    architecture: str
    model_type: str
    family: str | None
    kind: str
    task_types: list[str]
    built_for: str | None
    layers: list[LinearInfo] = field(default_factory=list)
    groups: list[LinearGroup] = field(default_factory=list)
    default_targets: list[str] = field(default_factory=list)
    all_linear: list[str] = field(default_factory=list)
    total_params: int | None = None
    lora_params: int | None = None
    weights_present: bool = False
    registry_modules: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    conversion: Any = None  # models.native.capabilities.ConversionFacts for a converted ChatGLM/Baichuan/Qwen-1


def _group_layers(layers: list[LinearInfo]) -> list[LinearGroup]:
    counts: dict[tuple[str, str, int, int, str], tuple[str, int]] = {}
    for i in layers:
        key = (i.group, i.suffix, i.in_features, i.out_features, i.cls_name)
        leaf, n = counts.get(key, (i.leaf, 0))
        counts[key] = (leaf, n + 1)
    order = {"attention": 0, "mlp": 1, "other": 2, "head": 3}
    groups = [LinearGroup(g, s, leaf, a, b, c, n) for (g, s, a, b, c), (leaf, n) in counts.items()]
    return sorted(groups, key=lambda x: order[x.group])  # stable: keeps model order inside a group


def _build_task(task_types: list[TaskType], kind: str) -> TaskType | None:
    natural = {"decoder-only": TaskType.CAUSAL_LM, "encoder-decoder": TaskType.SEQ_2_SEQ_LM,
               "encoder-only": TaskType.FEATURE_EXTRACTION}[kind]
    if natural in task_types:
        return natural
    return task_types[0] if task_types else None


def _output_head_names(model) -> set[str]:
    """Names PEFT's all-linear leaves out: the output embedding (LM head)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {n for n, m in model.named_modules() if head is not None and m is head}


def inspect_model(name_or_path: str | Path, trust_remote_code: bool = False) -> InspectReport:
    """Inspect a built-in name, a .gguf file or an HF model dir without loading its weights.

    Raises:
        ModelError: the model cannot be found, or its config cannot be read.
    """
    from loraforge.models.discovery import is_remote_placeholder, linear_modules, load_hf_config, meta_model
    from loraforge.models.gguf import resolve_model_path
    from loraforge.models.loader import _WEIGHT_GLOBS
    from loraforge.models.registry import family_for, model_kind, supported_task_types
    from loraforge.models.targets import default_target_modules

    model_dir = resolve_model_path(name_or_path)
    hf_config = load_hf_config(model_dir, trust_remote_code)
    fam = family_for(hf_config)
    kind = model_kind(hf_config)
    tasks = supported_task_types(hf_config)
    archs = getattr(hf_config, "architectures", None) or ["?"]
    report = InspectReport(
        source=str(name_or_path), model_dir=model_dir, architecture=archs[0],
        model_type=getattr(hf_config, "model_type", "?") or "?", family=fam.name if fam else None, kind=kind,
        task_types=[t.value for t in tasks], built_for=None,
        weights_present=any(any(model_dir.glob(g)) for g in _WEIGHT_GLOBS))
    _conversion(report, model_dir, hf_config)
    if is_remote_placeholder(hf_config):
        report.registry_modules = list(fam.remote_code_modules) if fam else []
        report.default_targets = default_target_modules(hf_config, None)
        report.notes.append("the model's own code is not available here (trust_remote_code off, code files missing, "
                            "or it needs an older transformers): module names come from loraforge's registry, "
                            "without shapes or parameter counts")
        return report
    task = _build_task(tasks, kind)
    if task is None:
        report.notes.append("transformers has no Auto class for this model's text tasks; nothing was built")
        return report
    model = meta_model(hf_config, task, trust_remote_code)
    report.built_for = task.value
    report.architecture = type(model).__name__
    report.layers = linear_modules(model)
    report.groups = _group_layers(report.layers)
    report.total_params = sum(p.numel() for p in model.parameters())
    report.default_targets = default_target_modules(hf_config, model)
    heads = _output_head_names(model)
    report.all_linear = list(dict.fromkeys(i.leaf for i in report.layers if i.name not in heads))
    chosen = [i for i in report.layers if any(i.name == t or i.name.endswith("." + t) for t in report.default_targets)]
    report.lora_params = sum(_LORA_R * (i.in_features + i.out_features) for i in chosen)
    if any(i.cls_name == "Conv1D" for i in report.layers):
        report.notes.append("Conv1D layers store weights transposed: PEFT sets fan_in_fan_out=True for them")
    if not report.weights_present:
        report.notes.append("no weight files in this folder: inspected from config.json alone")
    return report


def _conversion(report: InspectReport, model_dir: Path, hf_config) -> None:
    """A converted ChatGLM2/3, Baichuan2 or Qwen-1 folder: its source, names and per-method facts; an original
    checkpoint folder without weights (nothing to convert yet): what it would convert to."""
    from loraforge.models.native import (NATIVE_FAMILIES, family_of_checkpoint, family_of_converted, import_record,
                                         read_raw_config)

    fam = family_of_converted(hf_config)
    record = import_record(model_dir) if fam else None
    if fam is not None and record is not None:
        from loraforge.models.native.capabilities import conversion_facts

        report.conversion = conversion_facts(NATIVE_FAMILIES[record["family"]], record, hf_config)
        return
    original = family_of_checkpoint(read_raw_config(model_dir))
    if original is not None:
        why = original.refusal(read_raw_config(model_dir), model_dir)
        report.notes.append(f"this {original.name} checkpoint cannot be converted: {why}" if why else
                            f"with its weights this {original.name} checkpoint is converted to "
                            f"{original.native_architecture} (`loraforge convert`, or automatically as base_model); "
                            "inspect the converted folder for its native names and what each method can do")


def _format_conversion(c) -> list[str]:
    lines = [f"converted      from {c.source} ({c.variant}, family `{c.family}`) to {c.native_architecture}"]
    if c.fused:
        lines.append("fused names    " + "; ".join(f"{k} → {', '.join(v)}" for k, v in c.fused.items())
                     + "  (original names work in target_modules; `export --to original` fuses them back exactly)")
    if c.renamed:
        lines.append("renamed        " + ", ".join(f"{k} → {v}" for k, v in c.renamed.items()))
    width = max(len(k) for k in list(c.methods) + list(c.tasks))
    lines.append("per method     (on the converted model)")
    lines += [f"  {k:<{width}}  {v}" for k, v in c.methods.items()]
    lines.append("per task type")
    lines += [f"  {k:<{width}}  {v}" for k, v in c.tasks.items()]
    lines += [f"note           {n}" for n in c.notes]
    return lines


def format_inspect(report: InspectReport) -> str:
    """Plain-text report for the terminal."""
    lines = [
        f"model          {report.source}" + (f"  ({report.model_dir})" if str(report.model_dir) != report.source else ""),
        f"architecture   {report.architecture}  (model_type `{report.model_type}`, family "
        f"{report.family or 'unknown to loraforge'}"
        + (f", converted from `{report.conversion.family}`" if report.conversion is not None else "") + ")",
        f"kind           {report.kind}",
        f"task types     {', '.join(report.task_types) or 'none'}",
    ]
    if report.total_params is not None:
        lines.append(f"parameters     {report.total_params:,} ({_human(report.total_params)})"
                     + ("" if report.weights_present else "  [config only, no weights]"))
    if report.groups:
        lines.append(f"linear layers  (built for {report.built_for} on the meta device; name below the layer index, "
                     "in -> out, class, how many)")
        width = max(len(g.suffix) for g in report.groups)
        current = None
        for g in report.groups:
            if g.group != current:
                current = g.group
                lines.append(f"  {current}")
            lines.append(f"    {g.suffix:<{width}}  {g.in_features:>6} -> {g.out_features:<6}  {g.cls_name:<12} x{g.count}")
        leaves = list(dict.fromkeys(i.leaf for i in report.layers))
        lines.append(f"target names   {', '.join(leaves)}")
    elif report.registry_modules:
        lines.append(f"target names   {', '.join(report.registry_modules)}  (from loraforge's registry)")
    if report.default_targets:
        line = f"default target_modules  [{', '.join(report.default_targets)}]"
        if report.lora_params and report.total_params:
            line += (f"  (LoRA r={_LORA_R} adds {report.lora_params:,} trainable parameters, "
                     f"{100 * report.lora_params / report.total_params:.2f}%)")
        lines.append(line)
    if report.all_linear:
        lines.append(f"all-linear     adapts {', '.join(report.all_linear)} (not the LM head)")
    if report.conversion is not None:
        lines += _format_conversion(report.conversion)
    lines += [f"note           {n}" for n in report.notes]
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
