"""Loading a local Stable Diffusion pipeline: a diffusers pipeline dir or a single-file checkpoint, never a download."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loraforge.errors import ModelError, Problem

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# Components every SD 1.x/2.x/SDXL pipeline has; training and generation need all of them.
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def load_pipeline(base: str | Path, *, dtype=None, base_config: str | Path | None = None,
                  safety_checker: bool = False, key: str = "base_model") -> Any:
    """Load a Stable Diffusion pipeline from local files only.

    Args:
        base: a diffusers pipeline dir (with ``model_index.json``) or a single ``.safetensors`` / ``.ckpt``
            checkpoint in the original (A1111/CompVis) layout.
        dtype: torch dtype of the weights (default float32).
        base_config: single-file only — a local diffusers pipeline dir whose configs describe the checkpoint.
        safety_checker: keep the pipeline's NSFW checker if it has one (training turns it off, like the
            diffusers examples: validation images are of the user's own subject).
        key: the config key named in errors.

    Raises:
        ModelError: the path is missing, is not a pipeline, or a single file cannot be described offline.
    """
    import torch
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    dtype = dtype or torch.float32
    path = Path(base).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise ModelError([Problem(key, "not a diffusers pipeline dir (no model_index.json)", value=str(path),
                                      fix="give a dir saved with `pipeline.save_pretrained(...)` or a single "
                                          ".safetensors checkpoint")])
        components = json.loads(index.read_text(encoding="utf-8"))
        missing = [c for c in REQUIRED_COMPONENTS if c not in components]
        if missing:
            raise ModelError([Problem(key, f"pipeline `{components.get('_class_name')}` has no {', '.join(missing)}",
                                      value=str(path), allowed="Stable Diffusion 1.x / 2.x / XL pipelines")])
        kwargs: dict[str, Any] = {}
        if "safety_checker" in components and not safety_checker:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        try:
            return DiffusionPipeline.from_pretrained(path, dtype=dtype, local_files_only=True, **kwargs)
        except (OSError, ValueError) as e:
            raise ModelError([Problem(key, f"the pipeline dir does not load: {e}", value=str(path))]) from None
    if path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        cls = StableDiffusionPipeline
        cfg_kwargs: dict[str, Any] = {}
        if base_config is not None:
            config_dir = Path(base_config).expanduser()
            if not (config_dir / "model_index.json").is_file():
                raise ModelError([Problem("image.base_config", "not a diffusers pipeline dir (no model_index.json)",
                                          value=str(config_dir))])
            name = json.loads((config_dir / "model_index.json").read_text(encoding="utf-8")).get("_class_name", "")
            cls = StableDiffusionXLPipeline if "XL" in name else StableDiffusionPipeline
            cfg_kwargs["config"] = str(config_dir)
        try:
            pipe = cls.from_single_file(str(path), dtype=dtype, local_files_only=True, **cfg_kwargs)
        except Exception as e:  # diffusers raises OSError/ValueError/EnvironmentError/KeyError here
            raise ModelError([Problem(key, f"single-file checkpoint cannot be loaded offline: {e}", value=str(path),
                                      fix="set `image.base_config:` to a local diffusers pipeline dir of the same "
                                          "model family (e.g. a saved SD 1.5 pipeline), or convert the checkpoint "
                                          "to a diffusers dir once")]) from None
        if not safety_checker and getattr(pipe, "safety_checker", None) is not None:
            pipe.safety_checker = None
        return pipe
    raise ModelError([Problem(key, "no local Stable Diffusion model at this path", value=str(path),
                              allowed="a diffusers pipeline dir, or a .safetensors / .ckpt checkpoint file",
                              fix="models are never downloaded: point to a local copy")])


def is_sdxl(pipe: Any) -> bool:
    """SDXL pipelines carry a second text encoder and size conditioning."""
    return getattr(pipe, "text_encoder_2", None) is not None
