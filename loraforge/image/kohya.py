"""Export a diffusers-format LoRA to the kohya / AUTOMATIC1111 key format, with the true alpha.

kohya's format names each adapted module by its path with dots turned into underscores, under `lora_unet_`,
`lora_te_` (SD 1.x/2.x text encoder) or `lora_te1_`/`lora_te2_` (SDXL), and stores per module
`.lora_down.weight` (= PEFT's lora_A, [r, in]), `.lora_up.weight` (= lora_B, [out, r]) and `.alpha`; loaders
apply `up @ down * alpha / r`. diffusers' own `convert_state_dict_to_kohya` writes alpha = r, which silently
rescales any LoRA trained with lora_alpha != r — here alpha comes from the adapter's LoraConfig (stored in the
safetensors header by `save_lora`), from the run's config.yaml, or from the caller, and is never guessed.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from loraforge.atomic import atomic_write_bytes
from loraforge.errors import ModelError, Problem

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
# The key forms diffusers has written over the years for the same two matrices.
_KEY = re.compile(r"^(unet|text_encoder_2|text_encoder)\.(.+?)\."
                  r"(lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down|lora_linear_layer\.up)\.weight$")
_DOWN = {"lora_A", "lora.down", "lora_linear_layer.down"}
# Older diffusers files store a per-module alpha beside the matrices (`unet.<module>.alpha`).
_ALPHA_KEY = re.compile(r"^(unet|text_encoder_2|text_encoder)\.(.+)\.alpha$")


def export_kohya(lora_dir: str | Path, out_file: str | Path, alpha: float | None = None) -> Path:
    """Write `out_file` in kohya format from a diffusers LoRA (a run dir or its `.safetensors` file).

    Args:
        lora_dir: a dir holding `pytorch_lora_weights.safetensors` (a loraforge run dir or checkpoint), or the file.
        out_file: where to write the kohya `.safetensors`.
        alpha: the LoRA alpha to record; default: from the file's adapter metadata, else `config.yaml` beside it.

    Raises:
        ModelError: no LoRA file, keys in an unknown layout, or no way to know the true alpha.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save

    src = _weights_file(Path(lora_dir))
    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = f.metadata() or {}
    settings = _alpha_settings(src, header, alpha, has_alpha_keys=any(k.endswith(".alpha") for k in tensors))

    pairs: dict[tuple[str, str], dict[str, Any]] = {}
    stored_alphas: dict[tuple[str, str], float] = {}
    unknown = []
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            if a := _ALPHA_KEY.match(key):
                stored_alphas[(a.group(1), a.group(2))] = float(value)
            else:
                unknown.append(key)
            continue
        component, module, kind = m.groups()
        pairs.setdefault((component, module), {})["down" if kind in _DOWN else "up"] = value
    if unknown:
        raise ModelError([Problem(str(src), "keys in an unknown LoRA layout", value=unknown[:3],
                                  allowed="diffusers LoRA keys `unet.<module>.lora_A.weight` / `.lora.down.weight`")])

    # SDXL (two text encoders) names them te1/te2; SD 1.x/2.x's single encoder is `te`.
    prefixes = dict(_PREFIXES)
    if any(c == "text_encoder_2" for c, _ in pairs) or header_says_sdxl(header):
        prefixes["text_encoder"] = "lora_te1_"
    out: dict[str, Any] = {}
    for (component, module), mats in sorted(pairs.items()):
        if set(mats) != {"down", "up"}:
            lacking = "lora_up" if "down" in mats else "lora_down"
            raise ModelError([Problem(str(src), f"{component}.{module} lacks its {lacking} matrix")])
        rank = mats["down"].shape[0]
        name = prefixes[component] + _kohya_module(component, module).replace(".", "_")
        out[f"{name}.lora_down.weight"] = mats["down"].contiguous()
        out[f"{name}.lora_up.weight"] = mats["up"].contiguous()
        value = stored_alphas.get((component, module)) if alpha is None else None
        if value is None:
            value = _kohya_alpha(settings, component, module, rank)
        out[f"{name}.alpha"] = torch.tensor(value, dtype=torch.float32)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    alphas = [float(v) for k, v in out.items() if k.endswith(".alpha")]
    # The ss_* fields are what kohya's tools and A1111's extra-networks page display.
    atomic_write_bytes(out_file, save(out, metadata={
        "format": "pt", "ss_network_module": "networks.lora",
        "ss_network_dim": str(max(v["down"].shape[0] for v in pairs.values())),
        "ss_network_alpha": f"{alphas[0]:g}" if alphas else ""}))
    return out_file


def header_says_sdxl(header: dict[str, str]) -> bool:
    """The adapter metadata lists a `text_encoder_2` config only for SDXL LoRAs."""
    return "text_encoder_2." in header.get("lora_adapter_metadata", "")


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    if (path / WEIGHTS_NAME).is_file():
        return path / WEIGHTS_NAME
    found = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    raise ModelError([Problem("lora_dir", f"no {WEIGHTS_NAME} here", value=str(path),
                              allowed=", ".join(p.name for p in found) or None,
                              fix="give a loraforge image run dir (or checkpoint dir) or the weights file")])


def _alpha_settings(src: Path, header: dict[str, str], alpha: float | None,
                    has_alpha_keys: bool = False) -> dict[str, dict[str, Any]]:
    """Per component: lora_alpha, use_rslora, alpha_pattern — the numbers that set the LoRA scale."""
    components = ("unet", "text_encoder", "text_encoder_2")
    if alpha is not None:
        return {c: {"lora_alpha": float(alpha), "use_rslora": False, "alpha_pattern": {}} for c in components}
    if "lora_adapter_metadata" in header:
        meta = json.loads(header["lora_adapter_metadata"])
        settings = {c: {"lora_alpha": meta.get(f"{c}.lora_alpha"), "use_rslora": bool(meta.get(f"{c}.use_rslora")),
                        "alpha_pattern": meta.get(f"{c}.alpha_pattern") or {}} for c in components}
        if settings["unet"]["lora_alpha"] is not None or settings["text_encoder"]["lora_alpha"] is not None:
            return settings
    config = src.parent / "config.yaml"
    if config.is_file():
        import yaml

        data = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        if "lora_alpha" in data:
            return {c: {"lora_alpha": float(data["lora_alpha"]), "use_rslora": bool(data.get("use_rslora")),
                        "alpha_pattern": {}} for c in components}
    if has_alpha_keys:  # per-module `.alpha` keys; a module without one is an error later, never a guess
        return {c: {"lora_alpha": None, "use_rslora": False, "alpha_pattern": {}} for c in components}
    raise ModelError([Problem(str(src), "the LoRA's alpha is not recorded (no adapter metadata, no config.yaml)",
                              fix="pass the alpha it was trained with (`--alpha 16`); alpha = rank would silently "
                                  "change the LoRA's strength")])


def _kohya_alpha(settings: dict[str, dict[str, Any]], component: str, module: str, rank: int) -> float:
    """kohya scales by alpha / r, so the alpha that reproduces PEFT's scale: alpha (or alpha·√r with rsLoRA)."""
    s = settings[component]
    alpha = s["lora_alpha"]
    for pattern, value in s["alpha_pattern"].items():  # PEFT matches a pattern against the module path's end
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    if alpha is None:
        raise ModelError([Problem(component, "no lora_alpha recorded for this component", fix="pass --alpha")])
    return float(alpha) * math.sqrt(rank) if s["use_rslora"] else float(alpha)


def _kohya_module(component: str, module: str) -> str:
    """transformers 5's CLIPTextModel drops the `text_model.` level that A1111/kohya names still carry."""
    if component.startswith("text_encoder") and not module.startswith("text_model."):
        return "text_model." + module
    return module
