"""`export --to gguf-lora`: the adapter alone as a GGUF LoRA (llama.cpp `--lora`, Ollama's `ADAPTER` line).

llama.cpp's format: `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, and per adapted
weight `<gguf name>.lora_a` (r × in) and `.lora_b` (out × r); llama.cpp adds `scale · B @ A · x` with
`scale = alpha / r` (r read from each tensor pair). PEFT's per-module ranks/alphas (`rank_pattern`,
`alpha_pattern`) and rsLoRA's `alpha / sqrt(r)` do not fit one global alpha: then each module's scale is
folded into its B and alpha is written as 0, which llama.cpp reads as "scale 1".
The base's GGUF path (or name) is recorded under `adapter.base_model` for the user and for Ollama's FROM.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from loraforge.errors import LoraforgeError, Problem
from loraforge.exporters.base import Exporter, ExportRequest, ExportResult, output_dir

PEFT_PREFIX = "base_model.model."


def adapter_problems(config: Any) -> list[Problem]:
    """What keeps a PEFT adapter from being a plain GGUF LoRA."""
    problems = []
    kind = str(getattr(config.peft_type, "value", config.peft_type))
    if kind != "LORA":
        problems.append(Problem("run_dir", f"a {kind} adapter has no LoRA matrices", value=kind, allowed="LORA",
                                fix="export the merged model instead: --to gguf (LoRA) or serve it with loraforge serve"))
        return problems
    if getattr(config, "use_dora", False):
        problems.append(Problem("use_dora", "DoRA's magnitude vector has no GGUF LoRA form", value=True,
                                fix="export the merged model: --to gguf"))
    if getattr(config, "modules_to_save", None):
        problems.append(Problem("modules_to_save", "full trained copies of modules are not LoRA matrices",
                                value=list(config.modules_to_save), fix="export the merged model: --to gguf"))
    if getattr(config, "bias", "none") != "none" or getattr(config, "lora_bias", False):
        problems.append(Problem("bias", "trained biases are not part of a GGUF LoRA", value=config.bias,
                                fix="export the merged model: --to gguf"))
    return problems


def module_scale(config: Any, module: str) -> tuple[int, float]:
    """(r, alpha) PEFT used for `module` (its rank_pattern / alpha_pattern entry wins, matched by suffix)."""
    def pick(pattern: dict, default: Any) -> Any:
        for key, value in (pattern or {}).items():
            if module == key or module.endswith("." + key):
                return value
        return default
    return int(pick(config.rank_pattern, config.r)), float(pick(config.alpha_pattern, config.lora_alpha))


def plan_lora_tensors(adapter_dir: Path, config: Any, model_config: Any, arch: Any) -> tuple[list, float]:
    """(tensors, alpha): every lora_A/lora_B pair under llama.cpp's names, and the alpha to record."""
    import gguf
    from safetensors.torch import load_file

    import loraforge.exporters.gguf_model as gm

    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.name.upper()], model_config.num_hidden_layers)
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    modules = sorted({k[len(PEFT_PREFIX):].split(".lora_A.")[0] for k in weights if ".lora_A." in k})
    scales = {m: module_scale(config, m) for m in modules}
    rslora = bool(getattr(config, "use_rslora", False))
    uniform = not rslora and len({a / r for r, a in scales.values()}) <= 1 and len({r for r, _ in scales.values()}) <= 1
    planned = []
    for module in modules:
        a = weights[f"{PEFT_PREFIX}{module}.lora_A.weight"]
        b = weights[f"{PEFT_PREFIX}{module}.lora_B.weight"]
        name = tmap.get_name(module + ".weight", try_suffixes=(".weight",))
        if name is None:
            raise LoraforgeError([Problem("target_modules", f"no GGUF name for the adapted module {module}",
                                          value=module, fix="export the merged model: --to gguf")],
                                 title="cannot export --to gguf-lora")
        r, alpha = scales[module]
        fold = 1.0 if uniform else alpha / (math.sqrt(r) if rslora else r)
        leaf = module.rsplit(".", 1)[-1]
        n_head = heads if leaf == "q_proj" else kv_heads if leaf == "k_proj" else 0
        permute = n_head if arch.permute_qk else 0  # B's rows are the weight's output rows
        base = name[: -len(".weight")]
        planned.append(_planned(f"{base}.weight.lora_a", a, 0, 1.0))
        planned.append(_planned(f"{base}.weight.lora_b", b, permute, fold))
    alpha = float(next(iter(scales.values()))[1]) if uniform and scales else 0.0
    return planned, alpha


def _planned(name: str, tensor: Any, permute_heads: int, scale: float) -> Any:
    import gguf

    import loraforge.exporters.gguf_model as gm

    def load() -> Any:
        data = tensor.float().numpy() * scale
        return gm.permute_rows(data, permute_heads) if permute_heads else data

    f32 = gguf.GGMLQuantizationType.F32
    return gm.PlannedTensor(name, tuple(tensor.shape), f32, gm._nbytes(tuple(tensor.shape), f32), load)


def _run(request: ExportRequest) -> ExportResult:
    import shlex

    from transformers import AutoConfig

    import loraforge.exporters.gguf_model as gm
    from loraforge.exporters.source import resolve_run

    source = resolve_run(request.run_dir, request.base)
    if source.adapter_dir is None:
        raise LoraforgeError([Problem("run_dir", f"a {source.method} run is a complete model, not an adapter",
                                      value=str(request.run_dir), fix="export it with --to gguf")],
                             title="cannot export --to gguf-lora")
    problems = adapter_problems(source.peft_config)
    if problems:
        raise LoraforgeError(problems, title="cannot export --to gguf-lora")
    model_config = AutoConfig.from_pretrained(source.model_dir)
    route = (f"python convert_lora_to_gguf.py {shlex.quote(str(source.adapter_dir))} --base "
             f"{shlex.quote(str(source.model_dir))} --outfile {shlex.quote(str(request.out / 'lora.gguf'))}")
    arch = gm.arch_of_config(model_config.to_dict(), hf_route=route)
    tensors, alpha = plan_lora_tensors(source.adapter_dir, source.peft_config, model_config, arch)
    name = request.name or source.run_dir.resolve().name
    base_ref = request.base_gguf or str(source.model_dir)

    def metadata(writer: Any) -> None:
        writer.add_type("adapter")
        writer.add_name(name)
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", alpha)
        writer.add_string("adapter.base_model", base_ref)
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, Path(base_ref).name)

    with output_dir(request) as tmp:
        gm.write_gguf(Path(tmp) / f"{name}-lora.gguf", arch, metadata, tensors, progress=request.progress)
    path = request.out / f"{name}-lora.gguf"
    base_hint = request.base_gguf or "BASE.gguf (export the base: loraforge export BASE_DIR --to gguf --out DIR)"
    return ExportResult(request.out, [path], [
        f"wrote {path} ({len(tensors) // 2} adapted weights, alpha {alpha:g}{' (scales folded into B)' if not alpha else ''})",
        f"llama.cpp: llama-cli -m {base_hint} --lora {path}",
        f"Ollama Modelfile: FROM {request.base_gguf or 'BASE'}\\nADAPTER {path}"])


EXPORTER = Exporter("gguf-lora", "the adapter alone as a GGUF LoRA (llama.cpp --lora, Ollama ADAPTER)", _run)
