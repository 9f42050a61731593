"""Options of the Stable Diffusion LoRA recipe (task_type: text-to-image / image-to-image).

Nested under `image:` in the YAML; the shared keys (train_data_dir, metadata_path, base_model, lora_rank,
lora_alpha, target_modules, batch_size, gradient_accumulation_steps, epochs, learning_rate, output_dir,
save_steps) keep their top-level meaning.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class ImageOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    resolution: int = Field(512, gt=0, description="Training images are resized and cropped to this square size.")
    center_crop: bool = Field(True, description="Center crop (else random crop) after resizing the short side.")
    random_flip: bool = Field(False, description="Randomly flip images horizontally.")
    caption_extension: str = Field(".txt", description="Caption files beside images: `<image stem><ext>`.")
    train_text_encoder: bool = Field(False, description="Also train LoRA on the CLIP text encoder.")
    text_encoder_target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "out_proj"], description="Text-encoder modules to adapt when train_text_encoder is on."
    )
    validation_prompts: list[str] = Field([], description="Prompts rendered every validation_steps.")
    validation_steps: Union[int, None] = Field(None, gt=0, description="Render validation images every N steps.")
    num_inference_steps: int = Field(25, gt=0, description="Denoising steps for validation images.")
    noise_offset: float = Field(0.0, ge=0, description="Offset noise (improves very dark/bright images).")
    snr_gamma: Union[float, None] = Field(None, gt=0, description="Min-SNR loss weighting gamma (Hang et al. 2023); 5.0 is typical.")
    prediction_type: Union[Literal["epsilon", "v_prediction"], None] = Field(
        None, description="Training objective; default: the scheduler config's own."
    )
