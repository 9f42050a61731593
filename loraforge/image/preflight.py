"""Checks of an image run that need no weights: data, base model layout, resolution, target modules.

`loraforge validate` can call `check_image_run(cfg)` to report every problem of a text-to-image config in
seconds; training itself raises the same errors as it reaches each step.
"""

from __future__ import annotations

import json
from pathlib import Path

from loraforge.config import RunConfig
from loraforge.config.image import ImageOptions
from loraforge.errors import LoraforgeError, Problem
from loraforge.image.pipeline import REQUIRED_COMPONENTS, SINGLE_FILE_SUFFIXES


def check_image_run(cfg: RunConfig) -> list[Problem]:
    """Every problem found, in config → data → model order (an empty list means ready to train)."""
    from loraforge.image.data import collect_examples

    opts = cfg.image or ImageOptions()
    problems = options_problems(opts)
    try:
        collect_examples(cfg.train_data_dir, cfg.metadata_path, opts.caption_extension)
    except LoraforgeError as e:
        problems += e.problems
    problems += _model_problems(cfg, opts)
    return problems


def options_problems(opts: ImageOptions) -> list[Problem]:
    """Cross-field rules of the `image:` section."""
    if opts.validation_steps and not opts.validation_prompts:
        return [Problem("image.validation_steps", "is set but validation_prompts is empty", value=opts.validation_steps,
                        fix="add `validation_prompts: [a photo of sks dog]`, or remove validation_steps")]
    return []


def _model_problems(cfg: RunConfig, opts: ImageOptions) -> list[Problem]:
    path = Path(cfg.base_model).expanduser()
    if path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        return []  # its layout is only known once diffusers converts it; training reports problems then
    if not path.is_dir():
        return [Problem("base_model", "no local Stable Diffusion model at this path", value=cfg.base_model,
                        allowed="a diffusers pipeline dir, or a .safetensors / .ckpt checkpoint file")]
    index = path / "model_index.json"
    if not index.is_file():
        return [Problem("base_model", "not a diffusers pipeline dir (no model_index.json)", value=cfg.base_model)]
    components = json.loads(index.read_text(encoding="utf-8"))
    missing = [c for c in REQUIRED_COMPONENTS if c not in components]
    if missing:
        return [Problem("base_model", f"pipeline has no {', '.join(missing)}", value=cfg.base_model)]
    problems = []
    vae_config = path / "vae" / "config.json"
    if vae_config.is_file():
        blocks = json.loads(vae_config.read_text(encoding="utf-8")).get("block_out_channels", [0, 0, 0, 0])
        factor = 2 ** (len(blocks) - 1)
        if opts.resolution % factor:
            problems.append(Problem("image.resolution", f"must be a multiple of the VAE's scale factor {factor}",
                                    value=opts.resolution, fix=f"use {opts.resolution // factor * factor or factor}"))
    problems += _target_problems(cfg, path / "unet")
    return problems


def _target_problems(cfg: RunConfig, unet_dir: Path) -> list[Problem]:
    """Build the UNet from its config on the meta device (no memory, no weights) to check module names."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from loraforge.image.lora import check_targets, unet_targets

    if not (unet_dir / "config.json").is_file():
        return []
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(unet_dir))
    return check_targets(unet, unet_targets(cfg), "target_modules")
