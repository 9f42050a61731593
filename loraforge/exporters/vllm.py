"""`export --to vllm`: a LoRA adapter dir checked against what vLLM's LoRA loader reads, copied as it stands.

vLLM (`--enable-lora --lora-modules NAME=DIR`) reads `adapter_config.json` (`r`, `lora_alpha`,
`target_modules`, `use_rslora`, `modules_to_save`, `use_dora`, `bias`) and `adapter_model.safetensors`.
It applies one scale `lora_alpha / r` to every module and needs `--max-lora-rank` ≥ r (its default is 16;
allowed values below). What it cannot serve is reported here, all at once, before deployment:
prompt-learning adapters (prefix / prompt / P-tuning), DoRA, trained full copies (`modules_to_save`,
`trainable_token_indices`), trained biases and per-module ranks/alphas.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from loraforge.errors import LoraforgeError, Problem
from loraforge.exporters.base import Exporter, ExportRequest, ExportResult, output_dir

VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted --max-lora-rank values
VLLM_DEFAULT_MAX_LORA_RANK = 16
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def vllm_problems(adapter_config: dict[str, Any], files: set[str]) -> list[Problem]:
    """Every reason vLLM's LoRA loader would refuse (or silently mis-scale) this adapter."""
    problems = []
    kind = adapter_config.get("peft_type")
    if kind != "LORA":
        return [Problem("peft_type", f"vLLM serves only LoRA adapters; a {kind} adapter cannot be loaded", value=kind,
                        allowed="LORA", fix="serve it with loraforge serve (it supports every PEFT method)")]
    if adapter_config.get("use_dora"):
        problems.append(Problem("use_dora", "vLLM's LoRA loader does not support DoRA", value=True,
                                fix="merge it (loraforge export --to hf) and serve the merged model"))
    for key in ("modules_to_save", "trainable_token_indices"):
        if adapter_config.get(key):
            problems.append(Problem(key, "vLLM loads LoRA matrices only, not trained full copies of modules",
                                    value=adapter_config[key], fix="merge it (--to hf) and serve the merged model"))
    if adapter_config.get("bias", "none") != "none" or adapter_config.get("lora_bias"):
        problems.append(Problem("bias", "vLLM ignores or refuses trained LoRA biases", value=adapter_config.get("bias"),
                                fix="train with bias: none, or merge (--to hf)"))
    for key in ("rank_pattern", "alpha_pattern"):
        if adapter_config.get(key):
            problems.append(Problem(key, "vLLM applies one lora_alpha / r to every module: per-module values would "
                                    "be scaled wrong", value=adapter_config[key], fix="merge it (--to hf)"))
    r = int(adapter_config.get("r") or 0)
    if r > VLLM_MAX_LORA_RANKS[-1]:
        problems.append(Problem("r", "above vLLM's largest --max-lora-rank", value=r,
                                allowed=f"<= {VLLM_MAX_LORA_RANKS[-1]}", fix="merge it (--to hf)"))
    if not isinstance(adapter_config.get("target_modules"), (list, str)) or not adapter_config.get("target_modules"):
        problems.append(Problem("target_modules", "vLLM needs the adapted module names in adapter_config.json",
                                value=adapter_config.get("target_modules")))
    if "adapter_model.safetensors" not in files:
        problems.append(Problem("adapter_model.safetensors", "missing (vLLM reads safetensors adapters)",
                                value=sorted(files), fix="re-save the adapter with safe_serialization=True"))
    return problems


def max_lora_rank(r: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that fits rank `r`."""
    return next(v for v in VLLM_MAX_LORA_RANKS if v >= r)


def _run(request: ExportRequest) -> ExportResult:
    from loraforge.exporters.source import resolve_run

    source = resolve_run(request.run_dir, request.base)
    if source.adapter_dir is None:
        raise LoraforgeError([Problem("run_dir", f"a {source.method} run is a complete model: vLLM serves it "
                                      "directly", value=str(request.run_dir), fix=f"vllm serve {request.run_dir}")],
                             title="nothing to export --to vllm")
    adapter_dir = source.adapter_dir
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    problems = vllm_problems(config, {p.name for p in adapter_dir.iterdir()})
    if problems:
        raise LoraforgeError(problems, title="vLLM cannot serve this adapter")
    with output_dir(request) as tmp:
        for name in ADAPTER_FILES + TOKENIZER_FILES:
            if (adapter_dir / name).is_file():
                shutil.copy2(adapter_dir / name, Path(tmp) / name)
    r = int(config["r"])
    name = request.name or source.run_dir.resolve().name
    flag = "" if r <= VLLM_DEFAULT_MAX_LORA_RANK else f" --max-lora-rank {max_lora_rank(r)}"
    return ExportResult(request.out, [request.out / n for n in ADAPTER_FILES], [
        f"checked for vLLM: LoRA r={r}, alpha={config.get('lora_alpha')}, targets {config.get('target_modules')}",
        f"wrote {request.out}",
        f"serve: vllm serve {source.model_dir} --enable-lora --lora-modules {name}={request.out}{flag}"])


EXPORTER = Exporter("vllm", "a LoRA adapter checked against vLLM's LoRA loader (refuses what vLLM cannot serve)", _run)
