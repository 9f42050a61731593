"""A tiny, randomly initialized Stable Diffusion pipeline built from configs: tests and quick checks, no download.

The shapes follow SD 1.x (4 latent channels, cross-attention UNet, CLIP text encoder, DDPM training schedule)
so every code path of the recipe runs, only ~100× smaller: a 64 px image is 32×32 latents (the tiny VAE halves
the size once, SD's VAE divides by 8). The CLIP tokenizer is built offline from a character vocabulary and a
few merges, because transformers 5's `CLIPTokenizer` accepts a vocab dict and a merges list.
"""

from __future__ import annotations

import json
from pathlib import Path

from loraforge.atomic import atomic_dir

# Bump when the architecture below changes: the cached dir is then rebuilt instead of reused.
TINY_VERSION = 1
_DIR_NAME = f"tiny-sd-v{TINY_VERSION}"
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
_MERGES = [("r", "e"), ("re", "d</w>"), ("c", "a"), ("ca", "t</w>"), ("o", "g</w>"), ("d", "og</w>")]
TEXT_MAX_LENGTH = 16


def tiny_pipeline_dir(root: str | Path, seed: int = 0) -> Path:
    """Build (once) and return a tiny random `StableDiffusionPipeline` directory under ``root``.

    Idempotent: a complete dir from an earlier call is reused; the same seed always gives the same weights.
    The pipeline loads with `StableDiffusionPipeline.from_pretrained(dir, local_files_only=True)`.

    Args:
        root: parent folder; the pipeline is written to ``root/tiny-sd-v1-seed<seed>``.
        seed: seeds the random weights.
    """
    out = Path(root) / f"{_DIR_NAME}-seed{seed}"
    marker = out / "model_index.json"
    if marker.is_file():
        return out
    pipe = build_tiny_pipeline(seed)
    # Write next to the final place, then rename: a crash never leaves a half-written dir that looks complete.
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "loraforge_tiny.json").write_text(json.dumps({"version": TINY_VERSION, "seed": seed}), encoding="utf-8")
    return out


def build_tiny_pipeline(seed: int = 0):
    """The tiny `StableDiffusionPipeline` in memory (fp32, CPU)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TEXT_MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # SD 1.x's schedule: scaled-linear betas 0.00085 → 0.012 over 1000 steps, epsilon prediction.
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1, prediction_type="epsilon",
    )
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_sdxl_pipeline_dir(root: str | Path, seed: int = 0) -> Path:
    """Like `tiny_pipeline_dir`, for a tiny `StableDiffusionXLPipeline` (two text encoders, size conditioning)."""
    out = Path(root) / f"tiny-sdxl-v{TINY_VERSION}-seed{seed}"
    if (out / "model_index.json").is_file():
        return out
    pipe = build_tiny_sdxl_pipeline(seed)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out


def build_tiny_sdxl_pipeline(seed: int = 0):
    """The tiny `StableDiffusionXLPipeline` in memory: SDXL's conditioning (penultimate hidden states of two
    CLIP encoders concatenated, the pooled projection of the second, six size/crop numbers) at toy widths."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    time_dim, proj_dim = 8, 32
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * time_dim + proj_dim,  # six size numbers + pooled text
        cross_attention_dim=64,  # both encoders' hidden states side by side
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4, norm_num_groups=8, sample_size=64,
    )
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=TEXT_MAX_LENGTH, projection_dim=proj_dim, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    # SDXL's schedule: the SD betas, Euler sampling, "leading" timestep spacing.
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    return StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=CLIPTextModel(text_config),
        text_encoder_2=CLIPTextModelWithProjection(text_config),
        tokenizer=tokenizer, tokenizer_2=tiny_clip_tokenizer(), scheduler=scheduler, add_watermarker=False,
    )


def tiny_clip_tokenizer():
    """A CLIP BPE tokenizer over single characters plus a few merges (`red`, `cat`, `dog` are one token)."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for c in _CHARS:
        vocab[c] = len(vocab)
    for c in _CHARS:  # CLIP marks the last piece of a word with </w>
        vocab[c + "</w>"] = len(vocab)
    for a, b in _MERGES:
        vocab.setdefault(a + b, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=list(_MERGES), model_max_length=TEXT_MAX_LENGTH)
