"""Text-to-image and image-to-image with a local SD pipeline and any number of weighted LoRAs.

LoRAs are loaded with diffusers' own `load_lora_weights` (so loraforge run dirs, kohya/A1111 files and other
diffusers LoRAs all work) as named adapters, then mixed with `set_adapters(names, weights)`. Image-to-image
reuses the same components through `AutoPipelineForImage2Image.from_pipe`: no second copy of the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from loraforge.errors import ConfigError, ModelError, Problem
from loraforge.image.pipeline import load_pipeline

LORA_FILE_NAMES = ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors")


def load_generation_pipeline(base: str | Path, loras: Sequence[tuple[str | Path, float]] = (), *,
                             base_config: str | Path | None = None, safety_checker: bool = True) -> Any:
    """The base pipeline with each LoRA loaded as adapter `lora0`, `lora1`, … at its weight.

    Raises:
        ModelError: the base or a LoRA cannot be loaded (the LoRA is named).
    """
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = load_pipeline(base, dtype=dtype, base_config=base_config, safety_checker=safety_checker)
    names, weights = [], []
    for i, (path, weight) in enumerate(loras):
        name = f"lora{i}"
        folder, file_name = _lora_location(Path(path), f"loras[{i}]")
        try:
            pipe.load_lora_weights(str(folder), weight_name=file_name, adapter_name=name)
        except (ValueError, KeyError, OSError, RuntimeError) as e:
            raise ModelError([Problem(f"loras[{i}]", f"this LoRA does not fit the base model: {e}",
                                      value=str(path), fix="use a LoRA trained for this model family")]) from None
        names.append(name)
        weights.append(float(weight))
    if names:
        pipe.set_adapters(names, adapter_weights=weights)
    # Adapters are created with dropout modules in training mode: evaluate deterministically.
    for component in ("unet", "text_encoder", "text_encoder_2"):
        if getattr(pipe, component, None) is not None:
            getattr(pipe, component).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def render(pipe: Any, prompt: str, *, init_image: Any = None, strength: float = 0.75, num_inference_steps: int = 25,
           guidance_scale: float = 7.5, seed: int = 0, height: int | None = None, width: int | None = None,
           negative_prompt: str | None = None) -> Any:
    """One image from a loaded pipeline (text-to-image, or image-to-image when `init_image` is given).

    Raises:
        ConfigError: a bad strength / step count / size, or an unreadable init image.
    """
    import torch

    _check_args(strength, num_inference_steps, height, width, pipe.vae_scale_factor, init_image is not None)
    generator = torch.Generator().manual_seed(seed)
    common = dict(prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
                  guidance_scale=guidance_scale, generator=generator)
    if init_image is None:
        return pipe(height=height, width=width, **common).images[0]
    from diffusers import AutoPipelineForImage2Image

    image = _open_init_image(init_image)
    w, h = width or image.width, height or image.height
    f = pipe.vae_scale_factor
    size = (max(f, w // f * f), max(f, h // f * f))  # the VAE needs multiples of its scale factor
    if image.size != size:
        image = image.resize(size)
    img2img = AutoPipelineForImage2Image.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    return img2img(image=image, strength=strength, **common).images[0]


def generate_image(base: str | Path, prompt: str, *, loras: Sequence[tuple[str | Path, float]] = (),
                   init_image: Any = None, strength: float = 0.75, num_inference_steps: int = 25,
                   guidance_scale: float = 7.5, seed: int = 0, height: int | None = None, width: int | None = None,
                   negative_prompt: str | None = None, out_path: str | Path | None = None,
                   base_config: str | Path | None = None) -> Any:
    """Generate one image; returns a PIL image (also saved to `out_path` when given).

    Args:
        base: a local diffusers pipeline dir or single-file SD checkpoint.
        prompt: the text prompt.
        loras: (LoRA dir or .safetensors file, weight) pairs; weights scale each LoRA (1.0 = as trained).
        init_image: a path or PIL image → image-to-image; `strength` (0-1] is how far from it to go.
        num_inference_steps, guidance_scale, seed, height, width, negative_prompt: the usual sampling knobs.
        base_config: single-file checkpoints only, see `ImageOptions.base_config`.

    Raises:
        ModelError: base model or a LoRA cannot be loaded.
        ConfigError: bad sampling arguments or init image.
    """
    pipe = load_generation_pipeline(base, loras, base_config=base_config)
    image = render(pipe, prompt, init_image=init_image, strength=strength, num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, seed=seed, height=height, width=width,
                   negative_prompt=negative_prompt)
    if out_path is not None:
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        image.save(out_path)
    return image


def parse_lora_arg(text: str) -> tuple[str, float]:
    """CLI form `path` or `path:weight` (e.g. `runs/cat:0.8`) → (path, weight).

    Raises:
        ConfigError: the weight is not a number.
    """
    path, sep, weight = text.rpartition(":")
    if not sep or not path or "/" in weight or "\\" in weight:  # no weight given (or a Windows drive colon)
        return text, 1.0
    try:
        return path, float(weight)
    except ValueError:
        raise ConfigError([Problem("--lora", "the weight after `:` is not a number", value=text,
                                   fix="write `path/to/lora:0.8`")]) from None


def _lora_location(path: Path, key: str) -> tuple[Path, str]:
    if path.is_file():
        return path.parent, path.name
    if path.is_dir():
        for name in LORA_FILE_NAMES:
            if (path / name).is_file():
                return path, name
        found = sorted(p.name for p in path.glob("*.safetensors"))
        if len(found) == 1:
            return path, found[0]
        raise ModelError([Problem(key, "no LoRA weights file in this dir" if not found else
                                  "several .safetensors files here: name the one to load", value=str(path),
                                  allowed=", ".join(found or LORA_FILE_NAMES))])
    raise ModelError([Problem(key, "LoRA not found", value=str(path), fix="give a LoRA dir or .safetensors file")])


def _open_init_image(init_image: Any) -> Any:
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(init_image, Image.Image):
        return init_image.convert("RGB")
    try:
        with Image.open(init_image) as im:
            return ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise ConfigError([Problem("--init-image", f"cannot read the image: {e}", value=str(init_image))]) from None


def _check_args(strength: float, steps: int, height: int | None, width: int | None, factor: int, img2img: bool) -> None:
    problems = []
    if img2img and not 0 < strength <= 1:
        problems.append(Problem("--strength", "must be in (0, 1]", value=strength,
                                fix="0.3 stays close to the init image, 0.8 changes it a lot"))
    if steps < 1:
        problems.append(Problem("--steps", "must be at least 1", value=steps))
    elif img2img and 0 < strength <= 1 and int(steps * strength) < 1:
        problems.append(Problem("--steps", f"steps × strength = {steps * strength:g} leaves no denoising step",
                                value=steps, fix=f"use at least {int(1 / strength) + 1} steps"))
    for key, v in (("--height", height), ("--width", width)):
        if v is not None and (v <= 0 or v % factor):
            problems.append(Problem(key, f"must be a positive multiple of {factor}", value=v))
    if problems:
        raise ConfigError(problems)
