"""Options of the Stable Diffusion LoRA recipe (task_type: text-to-image / image-to-image).

Nested under `image:` in the YAML; the shared keys (train_data_dir, metadata_path, base_model, lora_rank,
lora_alpha, lora_dropout, target_modules — default `to_q, to_k, to_v, to_out.0` —, init_lora_weights,
batch_size, gradient_accumulation_steps, epochs, max_steps, learning_rate, lr_scheduler, warmup_steps,
max_grad_norm, seed, precision, gradient_checkpointing, save_steps, save_total_limit, resume_from_checkpoint,
output_dir, logging_steps) keep their top-level meaning. See docs/IMAGE.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

# The methods the Stable Diffusion recipe trains (PEFT LoRA on the UNet and text encoders).
IMAGE_METHODS = ("lora",)


class ImageOptions(BaseModel):
    """The `image:` section of a text-to-image run config."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # `.inf` is a typo

    resolution: int = Field(
        512, gt=0, description="Training images are resized (short side) and cropped to this square size; a multiple "
        "of 8 for SD's VAE (512 for SD 1.5, 768 for SD 2.x-v, 1024 for SDXL)."
    )
    center_crop: bool = Field(True, description="Center crop (else random crop) after resizing the short side.")
    random_flip: bool = Field(False, description="Randomly flip images horizontally.")
    caption_extension: str = Field(".txt", description="Caption files beside images: `<image stem><ext>`.")
    base_config: Union[Path, None] = Field(
        None,
        description="Single-file checkpoints (.safetensors/.ckpt) only: a local diffusers pipeline dir whose component "
        "configs describe the checkpoint (e.g. a saved SD 1.5 pipeline). Left out: diffusers looks for the matching "
        "configs in the local Hugging Face cache and never downloads.",
    )
    train_text_encoder: bool = Field(
        False, description="Also train LoRA on the CLIP text encoder (both encoders for SDXL): stronger prompt "
        "binding of a new token, more risk of overfitting."
    )
    text_encoder_target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "out_proj"], description="Text-encoder modules to adapt when train_text_encoder is on."
    )
    validation_prompts: list[str] = Field([], description="Prompts rendered into `<output_dir>/validation/` every validation_steps and at the end.")
    validation_steps: Union[int, None] = Field(None, gt=0, description="Render validation images every N steps.")
    num_inference_steps: int = Field(25, gt=0, description="Denoising steps for validation images.")
    guidance_scale: float = Field(7.5, ge=0, description="Classifier-free guidance scale for validation images (1 = off).")
    noise_offset: float = Field(0.0, ge=0, description="Offset noise strength (Guttenberg 2023): lets the model learn very dark/bright images; 0.05-0.1 typical, 0 = off.")
    snr_gamma: Union[float, None] = Field(None, gt=0, description="Min-SNR loss weighting gamma (Hang et al. 2023); 5.0 is typical.")
    prediction_type: Union[Literal["epsilon", "v_prediction"], None] = Field(
        None, description="Training objective; default: the scheduler config's own."
    )
    kohya_export: bool = Field(
        True, description="Also write `<output_dir>/lora_kohya.safetensors` (kohya/A1111 keys with the true alpha)."
    )

    @field_validator("caption_extension")
    @classmethod
    def _dot_extension(cls, v: str) -> str:
        if not v.startswith(".") or len(v) < 2:
            raise ValueError("must start with a dot, e.g. `.txt` or `.caption`")
        return v
