"""Back to the checkpoint's original layout: adapters (`export --to original`) and merged weights
(`merge --layout original`), for users who deploy with the family's own code (its demos, chatglm.cpp …).

A LoRA on the native q/k/v projections becomes ONE exact LoRA on the fused original weight (`query_key_value`,
`W_pack`, `c_attn`): A = [A_q; A_k; A_v] (rank k·r for k adapted parts) and B block-diagonal, so
B·A = [B_q A_q; B_k A_k; B_v A_v] — the stacked native update. Its `lora_alpha` is scaled so the fused
scaling equals the native one (α·k for plain LoRA, α·√k with rsLoRA), written per module in `rank_pattern` /
`alpha_pattern`. Other modules are renamed only.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from loraforge.errors import LoraforgeError, Problem
from loraforge.models.native import IMPORT_FILE, NATIVE_FAMILIES, import_record
from loraforge.models.native.base import NativeFamily, to_original_module

PEFT_PREFIX = "base_model.model."
# Files of the original checkpoint that a merged original-layout model needs besides its weights.
ORIGINAL_SIDE_FILES = ("tokenizer.model", "qwen.tiktoken", "tokenizer_config.json", "special_tokens_map.json",
                       "generation_config.json")


@dataclass
class OriginalExport:
    out: Path
    family: str
    modules: int
    fused: dict[str, int] = field(default_factory=dict)  # original leaf → fused rank
    max_delta_diff: float = 0.0

    def __str__(self) -> str:
        fused = ", ".join(f"{k} (rank {v})" for k, v in self.fused.items()) or "none"
        return (f"wrote a {self.family} original-layout adapter to {self.out}: {self.modules} modules, fused: "
                f"{fused}; max |ΔW fused − ΔW native| = {self.max_delta_diff:.1e}")


def _family_of_run(converted_dir: Path, key: str) -> tuple[NativeFamily, dict]:
    rec = import_record(converted_dir)
    if rec is None:
        raise LoraforgeError([Problem(key, "the run's base model is not a conversion of a ChatGLM2/3, Baichuan2 or "
                                      "Qwen-1 checkpoint (no loraforge_import.json there): it has no other layout",
                                      value=str(converted_dir))], title="no original layout")
    return NATIVE_FAMILIES[rec["family"]], rec


def _split_key(key: str) -> tuple[str, str, str]:
    """'base_model.model.X.lora_A.weight' → ('X', 'lora_A', 'weight')."""
    body = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    for kind in ("lora_A", "lora_B"):
        marker = f".{kind}."
        if marker in body:
            module, _, param = body.partition(marker)
            return module, kind, param
    raise KeyError(key)


def export_adapter(adapter_dir: Path, converted_dir: Path, out: Path) -> OriginalExport:
    """Write the adapter in `adapter_dir` (trained on the converted model in `converted_dir`) for the original
    remote-code model.

    Raises:
        LoraforgeError: not a plain LoRA adapter, or it adapts a module the original stores differently.
    """
    import torch
    from safetensors.torch import load_file, save_file

    from loraforge.atomic import atomic_dir

    adapter_dir, converted_dir, out = Path(adapter_dir), Path(converted_dir), Path(out)
    fam, rec = _family_of_run(converted_dir, "run_dir")
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or cfg.get("modules_to_save") \
            or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise LoraforgeError([Problem("run_dir", "only plain LoRA adapters (no DoRA, modules_to_save or per-module "
                                      "ranks) are exported to the original layout", value=str(adapter_dir),
                                      allowed="LoRA")], title="cannot export")
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    native_cfg = json.loads((converted_dir / "config.json").read_text())
    sizes = fam.part_sizes(native_cfg)
    r, alpha, rslora = int(cfg["r"]), float(cfg["lora_alpha"]), bool(cfg.get("use_rslora"))
    blocked = set(fam.not_exportable(rec["original_config"]))

    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    parts_of: dict[str, int] = {}
    for key, tensor in weights.items():
        module, kind, param = _split_key(key)
        if param != "weight":
            raise LoraforgeError([Problem("run_dir", f"unexpected adapter tensor {key}", value=key)])
        if module.rsplit(".", 1)[-1] in blocked:
            raise LoraforgeError([Problem("target_modules", f"a LoRA on `{module}` cannot be written for the original "
                                          f"{fam.name} model: it stores that weight differently (e.g. Baichuan2's "
                                          "NormHead normalizes lm_head at run time)", value=module,
                                          fix="train without it, or deploy the converted model")],
                                 title="cannot export")
        hit = to_original_module(fam, module)
        if hit is None:
            raise LoraforgeError([Problem("run_dir", f"`{module}` has no place in the original {fam.name} layout",
                                          value=module)], title="cannot export")
        orig, part, parts = hit
        groups.setdefault(orig, {}).setdefault(part, {})[kind] = tensor
        parts_of[orig] = parts

    out_tensors: dict[str, torch.Tensor] = {}
    rank_pattern, alpha_pattern, fused, worst = {}, {}, {}, 0.0
    scale = alpha / (math.sqrt(r) if rslora else r)
    for orig, by_part in groups.items():
        parts = parts_of[orig]
        if parts == 1:
            a, b = by_part[0]["lora_A"], by_part[0]["lora_B"]
        else:
            present = sorted(by_part)
            k = len(present)
            a = torch.cat([by_part[p]["lora_A"] for p in present], dim=0)
            b = torch.zeros(sum(sizes), k * r, dtype=a.dtype)
            offsets = [sum(sizes[:p]) for p in range(parts)]
            for j, p in enumerate(present):
                b[offsets[p]:offsets[p] + sizes[p], j * r:(j + 1) * r] = by_part[p]["lora_B"]
            rank_pattern[orig] = k * r
            alpha_pattern[orig] = alpha * (math.sqrt(k) if rslora else k)
            fused[orig.rsplit(".", 1)[-1]] = k * r
            # exactness: the fused update equals the stacked native updates (zeros where a part is not adapted)
            f_scale = alpha_pattern[orig] / (math.sqrt(k * r) if rslora else k * r)
            native = torch.zeros(sum(sizes), a.shape[1], dtype=torch.float64)
            for p in present:
                d = by_part[p]["lora_B"].double() @ by_part[p]["lora_A"].double() * scale
                native[offsets[p]:offsets[p] + sizes[p]] = d
            worst = max(worst, float((b.double() @ a.double() * f_scale - native).abs().max()))
        out_tensors[f"{PEFT_PREFIX}{orig}.lora_A.weight"] = a.contiguous()
        out_tensors[f"{PEFT_PREFIX}{orig}.lora_B.weight"] = b.contiguous()

    new_cfg = dict(cfg)
    new_cfg.update(target_modules=sorted({o.rsplit(".", 1)[-1] for o in groups}), rank_pattern=rank_pattern,
                   alpha_pattern=alpha_pattern, base_model_name_or_path=rec.get("source"),
                   layers_to_transform=None, layers_pattern=None, task_type="CAUSAL_LM")
    with atomic_dir(out) as tmp:
        save_file(out_tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(new_cfg, indent=2))
        (tmp / "loraforge_export.json").write_text(json.dumps(
            {"layout": "original", "family": fam.name, "variant": rec.get("variant"), "source": rec.get("source"),
             "from_adapter": str(adapter_dir), "max_delta_diff": worst}, indent=1))
    return OriginalExport(out, fam.name, len(groups), fused, worst)


def to_original_checkpoint(native_dir: Path, converted_dir: Path, out: Path) -> Path:
    """Rewrite the native model in `native_dir` (a merge of a run on `converted_dir`) in the original weight names
    and config, with the original tokenizer files when the source checkpoint is still there."""
    import torch

    from loraforge.atomic import atomic_dir
    from loraforge.models.native.shards import ShardWriter, iter_tensors

    fam, rec = _family_of_run(converted_dir, "base")
    native_cfg = json.loads((Path(native_dir) / "config.json").read_text())
    sizes = fam.part_sizes(native_cfg)
    pending: dict[str, dict[int, torch.Tensor]] = {}
    with atomic_dir(out) as tmp:
        writer = ShardWriter(tmp)
        for name, tensor in iter_tensors(Path(native_dir)):
            module, _, param = name.rpartition(".")
            hit = to_original_module(fam, module)
            if hit is None:
                raise LoraforgeError([Problem("run_dir", f"`{name}` has no place in the original {fam.name} layout",
                                              value=name)])
            orig, part, parts = hit
            if parts == 1:
                writer.add(f"{orig}.{param}", tensor)
                continue
            slot = pending.setdefault(f"{orig}.{param}", {})
            slot[part] = tensor
            if len(slot) == parts:
                writer.add(f"{orig}.{param}", torch.cat([slot[p] for p in range(parts)], dim=0))
                del pending[f"{orig}.{param}"]
        if pending:
            raise LoraforgeError([Problem("run_dir", "incomplete fused weights", value=sorted(pending)[:3])])
        writer.close()
        (tmp / "config.json").write_text(json.dumps(rec["original_config"], indent=2))
        src = Path(rec.get("source") or "")
        for name in ORIGINAL_SIDE_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        for code in src.glob("*.py") if src.is_dir() else ():
            shutil.copy2(code, tmp / code.name)
        (tmp / "loraforge_export.json").write_text(json.dumps(
            {"layout": "original", "family": fam.name, "from": str(native_dir), "sizes": sizes}, indent=1))
    return Path(out)


def converted_base_of_run(run_dir: Path) -> Path:
    """The converted base folder a run trained on (from its run.json or config.yaml)."""
    from loraforge.models.gguf import resolve_model_path

    run_json = Path(run_dir) / "run.json"
    if run_json.is_file():
        info = json.loads(run_json.read_text())
        if info.get("model_dir") and (Path(info["model_dir"]) / IMPORT_FILE).is_file():
            return Path(info["model_dir"])
    from loraforge.inference import read_run_config

    base = read_run_config(Path(run_dir)).get("base_model")
    if not base:
        raise LoraforgeError([Problem("run_dir", "the run does not record its base model", value=str(run_dir))])
    return resolve_model_path(base)
