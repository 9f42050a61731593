"""PEFT LoRA on the UNet (and optionally the CLIP text encoder), saved in the diffusers LoRA format.

The saved file is what `pipeline.load_lora_weights(dir)` reads: keys `unet.<module>.lora_A/B.weight` (PEFT
naming under the component prefix) and, in the safetensors header, each component's `LoraConfig` — so the
loader rebuilds the adapter with the true `lora_alpha` instead of assuming alpha = rank.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from loraforge.config import RunConfig
from loraforge.config.image import ImageOptions
from loraforge.errors import ConfigError, Problem, suggestion

# Attention projections of every transformer block (self- and cross-attention), as in the diffusers LoRA
# examples and kohya's default network: a small adapter that still changes style and subject.
DEFAULT_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
ADAPTER = "default"


def unet_targets(cfg: RunConfig) -> list[str] | str:
    return DEFAULT_UNET_TARGETS if cfg.target_modules is None else cfg.target_modules


def add_lora(pipe: Any, cfg: RunConfig, opts: ImageOptions) -> None:
    """Freeze the pipeline and add trainable LoRA adapters named `default` (UNet; text encoder if asked).

    Raises:
        ConfigError: a target module name matches nothing (PEFT would silently skip it when another matches).
    """
    from peft import LoraConfig

    for module in [pipe.unet, pipe.vae] + [m for _, m in text_encoders(pipe)]:
        module.requires_grad_(False)
    problems = check_targets(pipe.unet, unet_targets(cfg), "target_modules")
    if opts.train_text_encoder:
        for _, encoder in text_encoders(pipe):
            problems += check_targets(encoder, opts.text_encoder_target_modules, "image.text_encoder_target_modules")
    problems = list(dict.fromkeys(problems))  # SDXL's two encoders would report the same name twice
    if problems:
        raise ConfigError(problems)

    def lora_config(targets: list[str] | str) -> LoraConfig:
        return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          init_lora_weights=cfg.init_lora_weights, target_modules=targets,
                          use_rslora=cfg.use_rslora, use_dora=cfg.use_dora)

    pipe.unet.add_adapter(lora_config(unet_targets(cfg)), adapter_name=ADAPTER)
    if opts.train_text_encoder:
        for _, encoder in text_encoders(pipe):
            encoder.add_adapter(lora_config(opts.text_encoder_target_modules), adapter_name=ADAPTER)
    # Adapters train in fp32 even when the frozen base is bf16/fp16: tiny LoRA updates vanish in 16-bit.
    for module in trainable_modules(pipe, opts):
        for p in module.parameters():
            if p.requires_grad:
                p.data = p.data.float()


def text_encoders(pipe: Any) -> list[tuple[str, Any]]:
    """(component name, module) of each text encoder: one for SD 1.x/2.x, two for SDXL."""
    return [(name, getattr(pipe, name)) for name in ("text_encoder", "text_encoder_2")
            if getattr(pipe, name, None) is not None]


def trainable_components(pipe: Any, opts: ImageOptions) -> list[tuple[str, Any]]:
    """(component name, module) of everything that carries a trainable adapter."""
    return [("unet", pipe.unet)] + (text_encoders(pipe) if opts.train_text_encoder else [])


def trainable_modules(pipe: Any, opts: ImageOptions) -> list[Any]:
    return [m for _, m in trainable_components(pipe, opts)]


def check_targets(model: Any, targets: list[str] | str, key: str) -> list[Problem]:
    """Every listed name must match a module (`name` or `*.name`, PEFT's rule); a string is a regex."""
    import torch

    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    if isinstance(targets, str):
        if targets == "all-linear" or any(re.fullmatch(targets, n) for n in names):
            return []
        return [Problem(key, "the regex matches no module", value=targets, fix="e.g. `to_q|to_k|to_v|to_out.0`")]
    leaves = sorted({n.split(".")[-1] if not n.endswith(".0") else ".".join(n.split(".")[-2:]) for n in names})
    problems = []
    for i, t in enumerate(targets):
        if not any(n == t or n.endswith("." + t) for n in names):
            problems.append(Problem(f"{key}[{i}]", "matches no module of the model", value=t,
                                    allowed=", ".join(leaves[:40]), fix=suggestion(t, leaves)))
    return problems


def lora_state_dicts(pipe: Any, opts: ImageOptions) -> dict[str, dict]:
    """Component name → its LoRA weights with PEFT key names (`<module>.lora_A.weight`), which diffusers loads.

    Not `convert_state_dict_to_diffusers`: it renames only attention projections (`to_q.lora.down`) and leaves
    other targets in PEFT form (`proj_in.lora_A`); diffusers' loader then takes the file for PEFT format and
    silently drops every renamed module (measured: with `[to_q, proj_in]` no `to_q` adapter was loaded).
    """
    from peft.utils import get_peft_model_state_dict

    def export(module: Any) -> dict:
        sd = get_peft_model_state_dict(module, adapter_name=ADAPTER)
        return {k: v.detach().float().contiguous().cpu() for k, v in sd.items()}

    return {name: export(module) for name, module in trainable_components(pipe, opts)}


def save_lora(out_dir: Path, pipe: Any, opts: ImageOptions) -> Path:
    """Write `out_dir/pytorch_lora_weights.safetensors` with each adapter's LoraConfig in the header."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    writer = StableDiffusionXLPipeline if getattr(pipe, "text_encoder_2", None) is not None else StableDiffusionPipeline
    kwargs: dict[str, Any] = {}
    for name, sd in lora_state_dicts(pipe, opts).items():
        kwargs[f"{name}_lora_layers"] = sd
        kwargs[f"{name}_lora_adapter_metadata"] = _metadata(getattr(pipe, name))
    writer.save_lora_weights(out_dir, weight_name=WEIGHTS_NAME, **kwargs)
    return Path(out_dir) / WEIGHTS_NAME


def _metadata(module: Any) -> dict:
    meta = module.peft_config[ADAPTER].to_dict()
    # diffusers rebuilds the adapter from this header, and PEFT creates its dropout modules in training mode
    # even inside an eval-mode UNet: a plain `pipe.load_lora_weights(dir)` would then apply dropout at every
    # denoising step (measured: after load_lora_weights the p=0.05 dropout modules are in train mode and the
    # same forward gives different outputs call to call). Dropout is a training-only setting, so the
    # header records 0; the run's config.yaml keeps the value trained with.
    meta["lora_dropout"] = 0.0
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}


def load_lora_into_adapters(pipe: Any, opts: ImageOptions, weights_dir: Path) -> None:
    """Fill the trainable `default` adapters from a saved file (resume): same keys as `save_lora` writes."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    sd = load_file(str(Path(weights_dir) / WEIGHTS_NAME))
    for prefix, module in trainable_components(pipe, opts):
        sub = {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}
        result = set_peft_model_state_dict(module, convert_unet_state_dict_to_peft(sub), adapter_name=ADAPTER)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ConfigError([Problem("resume_from_checkpoint", f"checkpoint {prefix} weights do not fit the adapter",
                                       value=unexpected[:3],
                                       fix="resume with the config the checkpoint was made with")])
