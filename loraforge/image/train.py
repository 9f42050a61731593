"""The Stable Diffusion LoRA recipe, top to bottom: data → pipeline → LoRA → plan → loop → save.

One optimizer step = `gradient_accumulation_steps` micro-batches. Each micro-batch m is fully determined by
(seed, m): which images (an epoch-seeded shuffle), their crops/flips, the VAE latent sample, the noise and the
timesteps all come from generators seeded with (seed, m). So a resumed run replays exactly what an uninterrupted
run would; the global torch RNG (LoRA dropout) is saved in each checkpoint for the same reason.

The objective is the one of Rombach et al. 2022 (latent diffusion): encode the image to latents, add noise at a
random timestep, and regress the UNet's output onto the noise (epsilon) or onto the velocity
v = α·ε − σ·x₀ (Salimans & Ho 2022) — whichever the scheduler config says the model predicts.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from loraforge.config import RunConfig, save_config
from loraforge.config.image import ImageOptions
from loraforge.errors import ConfigError, Problem
from loraforge.image.data import ImageExample, collect_examples, expand_repeats, load_image_with_geometry
from loraforge.image.lora import (WEIGHTS_NAME, add_lora, load_lora_into_adapters, save_lora, text_encoders,
                                  trainable_modules)
from loraforge.image.pipeline import is_sdxl, load_pipeline
from loraforge.image.preflight import options_problems
from loraforge.train.lock import holds_output_dir

KOHYA_NAME = "lora_kohya.safetensors"
RUN_FILES = (WEIGHTS_NAME, KOHYA_NAME, "config.yaml", "run.json", "metrics.jsonl", "loss.png", "tensorboard",
             "validation")


@dataclass(frozen=True)
class Plan:
    """Which images make micro-batch m: epoch e is a shuffle of all views seeded by (seed, e)."""

    n_views: int
    batch_size: int
    grad_accum: int
    seed: int
    total_steps: int

    @property
    def per_epoch(self) -> int:
        return math.ceil(self.n_views / self.batch_size)

    def micro_batch(self, m: int) -> list[int]:
        epoch, pos = divmod(m, self.per_epoch)
        order = list(range(self.n_views))
        random.Random(_mix(self.seed, epoch, 1)).shuffle(order)
        return order[pos * self.batch_size:(pos + 1) * self.batch_size]

    def epoch_of(self, m: int) -> float:
        return round(m / self.per_epoch, 4)


@dataclass
class _Run:
    """What the steps of one image run share."""

    cfg: RunConfig
    opts: ImageOptions
    pipe: Any
    noise_scheduler: Any
    views: list[ImageExample]
    plan: Plan
    optimizer: Any
    scheduler: Any
    state: Any  # train.checkpoint.TrainState
    run_dir: Path
    precision: str
    device: torch.device


@holds_output_dir  # not a model folder, and one run per output_dir
def train_image_lora(cfg: RunConfig, *, echo: Callable[[str], None] = print) -> Path:
    """Train a Stable Diffusion LoRA as `cfg` says; returns the run dir.

    The run dir holds `pytorch_lora_weights.safetensors` (load with `pipeline.load_lora_weights(run_dir)`),
    `lora_kohya.safetensors` (A1111/ComfyUI), `config.yaml`, `run.json`, `metrics.jsonl`, `loss.png`,
    `validation/` images and `checkpoint-N/` dirs.

    Raises:
        DataError: unreadable images or missing captions (all listed, before any model is loaded).
        ModelError: the base model is not a local SD pipeline / checkpoint.
        ConfigError: bad target modules, resolution, precision or resume point.
        TrainingDiverged: the loss or the gradient norm became inf/NaN (as in the text recipe).
        TrainingInterrupted: Ctrl-C / SIGTERM, once the current step is checkpointed.
    """
    from loraforge.train.checkpoint import STATE_FILE, TrainState, load_checkpoint
    from loraforge.train.engine import catch_stop_signals, seed_everything
    from loraforge.train.logging import RunLogger, plot_loss
    from loraforge.train.optim import build_optimizer, build_scheduler
    from loraforge.train.setup import prepare_run_dir, resolve_precision

    t_start = time.time()
    opts = cfg.image or ImageOptions()
    if problems := options_problems(opts):
        raise ConfigError(problems)
    run_dir, resume_from = prepare_run_dir(cfg, is_main=True, artifacts=RUN_FILES,
                                           required=(STATE_FILE, WEIGHTS_NAME), kind="loraforge image")
    seed_everything(cfg.seed)

    # Data first: a corrupt image is reported before minutes of model loading.
    examples = collect_examples(cfg.train_data_dir, cfg.metadata_path, opts.caption_extension)
    views = expand_repeats(examples)
    echo(f"data: {len(examples)} images, {len(views)} views per epoch (with folder repeats)")

    precision = resolve_precision(cfg.precision)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = _load_for_training(cfg, opts, precision, device)
    noise_scheduler = _training_scheduler(pipe, opts)
    holder = _add_trainable_lora(pipe, cfg, opts)
    n_trainable = sum(p.numel() for p in holder.parameters() if p.requires_grad)
    echo(f"LoRA: {n_trainable:,} trainable parameters (rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g})")

    per_epoch = math.ceil(len(views) / cfg.batch_size)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch / cfg.gradient_accumulation_steps))
    plan = Plan(len(views), cfg.batch_size, cfg.gradient_accumulation_steps, cfg.seed, total)
    optimizer = build_optimizer(holder, cfg)
    scheduler = build_scheduler(optimizer, cfg, total)

    state = TrainState()
    if resume_from is not None:
        load_lora_into_adapters(pipe, opts, resume_from)
        state = load_checkpoint(resume_from, optimizer, scheduler)
        echo(f"resumed from {resume_from} at step {state.global_step}")
    run = _Run(cfg, opts, pipe, noise_scheduler, views, plan, optimizer, scheduler, state, run_dir,
               precision, device)
    tensorboard = "tensorboard" in cfg.report_to and _has_tensorboard()
    # On resume the logger drops the lines the interrupted run wrote after its checkpoint.
    logger = RunLogger(run_dir, total_steps=total, start_step=state.global_step, enabled=True,
                       tensorboard=tensorboard, append=resume_from is not None)
    try:
        with catch_stop_signals() as stop:
            _loop(run, logger, stop)
    finally:
        logger.close()

    _save(run, echo)
    if cfg.plot_loss:
        plot_loss(state.history, run_dir / "loss.png")
    _write_run_json(run, len(examples), n_trainable, time.time() - t_start)
    return run_dir


def _add_trainable_lora(pipe: Any, cfg: RunConfig, opts: ImageOptions) -> torch.nn.ModuleList:
    """Add the LoRA adapters (and gradient checkpointing); returns one module holding every trainable one, so the
    shared AdamW helper sees them all."""
    add_lora(pipe, cfg, opts)
    if cfg.gradient_checkpointing:  # recompute activations in backward: ~30% slower, much less memory at 1024 px
        pipe.unet.enable_gradient_checkpointing()
        if opts.train_text_encoder:
            for _, encoder in text_encoders(pipe):
                encoder.activation_checkpointing_enable({"use_reentrant": False})
    return torch.nn.ModuleList(trainable_modules(pipe, opts))


def _loop(run: _Run, logger, stop: list[int]) -> None:
    """The optimizer steps from `state.global_step` to `plan.total_steps`, with logging, validation and saves.

    Raises:
        TrainingDiverged: a non-finite loss or gradient norm (the optimizer has not stepped on it).
        TrainingInterrupted: after SIGINT/SIGTERM (`stop` non-empty), once the current step is checkpointed.
    """
    from loraforge.train.checkpoint import save_checkpoint
    from loraforge.train.engine import TrainingInterrupted, accumulate, diverged, stop_requested, stop_signal, update

    cfg, opts, pipe, plan, state = run.cfg, run.opts, run.pipe, run.plan, run.state

    def checkpoint() -> Path:
        return save_checkpoint(run.run_dir, state, lambda d: save_lora(d, pipe, opts), run.optimizer, run.scheduler,
                               keep=cfg.save_total_limit)

    params = [p for m in trainable_modules(pipe, opts) for p in m.parameters() if p.requires_grad]
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run.precision)
    scaler = torch.amp.GradScaler("cuda", enabled=run.precision == "fp16")

    def loss_of(m: int) -> torch.Tensor:  # micro-batch m: its images, crops, noise and timesteps from (seed, m)
        with _autocast(run.device, amp_dtype):
            return _micro_batch_loss(pipe, run.noise_scheduler, opts, [run.views[i] for i in plan.micro_batch(m)],
                                     _mix(cfg.seed, m, 2), run.device)

    def clip(max_norm: float) -> torch.Tensor:
        scaler.unscale_(run.optimizer)  # a no-op unless fp16
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def step() -> None:
        scaler.step(run.optimizer)  # under fp16, skipped when the gradients hold inf/NaN
        scaler.update()

    window: list[float] = []
    while state.global_step < plan.total_steps:
        n = state.global_step  # steps done before this one
        for module in trainable_modules(pipe, opts):
            module.train()
        micro_batches = [n * plan.grad_accum + k for k in range(plan.grad_accum)]
        total = accumulate(micro_batches, loss_of, lambda loss: scaler.scale(loss / plan.grad_accum).backward(),
                           device=run.device)
        step_loss = total.item() / plan.grad_accum
        if not math.isfinite(step_loss):
            raise diverged(n + 1, f"loss is {step_loss}", cfg.learning_rate, run.run_dir)
        bad_grad = None if run.precision == "fp16" else \
            (lambda g: diverged(n + 1, f"gradient norm is {g} (loss {step_loss:.4g})", cfg.learning_rate, run.run_dir))
        lr, _ = update(run.optimizer, run.scheduler, clip, cfg.max_grad_norm, stop_on_bad_grad=bad_grad, step=step)
        state.global_step += 1
        window.append(step_loss)
        logger.progress(1, loss=step_loss)

        done = state.global_step == plan.total_steps
        if state.global_step % cfg.logging_steps == 0 or done:
            record = {"step": state.global_step, "epoch": plan.epoch_of((n + 1) * plan.grad_accum),
                      "loss": sum(window) / len(window), "lr": lr}
            window.clear()
            state.history.append(record)
            logger.log(record)
        due = bool(opts.validation_steps) and state.global_step % opts.validation_steps == 0
        if opts.validation_prompts and (due or done):
            paths = render_validation(pipe, opts, cfg.seed, state.global_step, run.run_dir / "validation", run.device)
            logger.write(f"step {state.global_step}: {len(paths)} validation images in {paths[0].parent}")
        if cfg.save_steps and state.global_step % cfg.save_steps == 0 and not done:
            checkpoint()
        if stop_requested(stop) and not done:
            raise TrainingInterrupted(checkpoint(), stop_signal(stop))


def _save(run: _Run, echo: Callable[[str], None]) -> None:
    """The run dir itself is the LoRA, in diffusers format and kohya format, with its resolved config."""
    cfg, opts = run.cfg, run.opts
    save_lora(run.run_dir, run.pipe, opts)
    save_config(cfg, run.run_dir / "config.yaml")
    if opts.kohya_export and cfg.use_dora:
        echo("kohya export skipped: the kohya/A1111 LoRA format has no DoRA magnitude vectors")
    elif opts.kohya_export:
        from loraforge.image.kohya import export_kohya

        export_kohya(run.run_dir, run.run_dir / KOHYA_NAME)


def _micro_batch_loss(pipe: Any, noise_scheduler: Any, opts: ImageOptions, batch: list[ImageExample],
                      seed: int, device: torch.device) -> torch.Tensor:
    """Diffusion loss of one micro-batch; every random draw comes from generators seeded with `seed`."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    loaded = [load_image_with_geometry(ex.path, opts.resolution, center_crop=opts.center_crop,
                                       flip=opts.random_flip and rng.random() < 0.5, rng=rng) for ex in batch]
    pixels = torch.from_numpy(np.stack([arr for arr, _, _ in loaded]))
    vae = pipe.vae
    with torch.no_grad():
        dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
        eps = torch.randn(dist.mean.shape, generator=gen).to(device, dist.mean.dtype)
        latents = (dist.mean + dist.std * eps).float() * vae.config.scaling_factor  # a sample of q(z|x)
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=gen).to(device)
    if opts.noise_offset:
        # A per-channel constant shift: plain Gaussian noise never changes an image's mean brightness much.
        noise = noise + opts.noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=gen).to(device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=gen).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)

    captions = [ex.caption for ex in batch]
    with contextlib.nullcontext() if opts.train_text_encoder else torch.no_grad():
        if is_sdxl(pipe):
            text, added = _sdxl_conditioning(pipe, captions, [(g, c) for _, g, c in loaded], opts.resolution, device)
        else:
            ids = pipe.tokenizer(captions, padding="max_length", truncation=True,
                                 max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
            text, added = pipe.text_encoder(ids.to(device))[0], None  # [b, tokens, cross_attention_dim]
    pred = pipe.unet(noisy.to(pipe.unet.dtype), timesteps, text.to(pipe.unet.dtype), added_cond_kwargs=added).sample

    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    per_sample = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if opts.snr_gamma:
        per_sample = per_sample * _min_snr_weights(noise_scheduler, timesteps, opts.snr_gamma)
    return per_sample.mean()


def fixed_noise_loss(pipe: Any, opts: ImageOptions, examples: list[ImageExample], seeds: range = range(16)) -> float:
    """Mean diffusion loss of `examples` over fixed noise/timestep draws (one batch per seed): the same draws for
    every pipeline, so a base and base+LoRA are compared on equal terms — lower means the LoRA fits the data."""
    device = next(pipe.unet.parameters()).device
    noise_scheduler = _training_scheduler(pipe, opts)
    with torch.no_grad():
        return float(np.mean([_micro_batch_loss(pipe, noise_scheduler, opts, examples, seed, device).item()
                              for seed in seeds]))


def _sdxl_conditioning(pipe: Any, captions: list[str], geometry: list[tuple[tuple[int, int], tuple[int, int]]],
                       resolution: int, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SDXL's text and micro-conditioning, built by the pipeline's own `encode_prompt` (so training sees exactly
    what inference feeds the UNet): both encoders' penultimate states side by side, the second's pooled
    projection, and (original h, w, crop top, left, target h, w) per image."""
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=captions, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    time_ids = torch.tensor([[*orig, *crop, resolution, resolution] for orig, crop in geometry],
                            dtype=embeds.dtype, device=device)
    return embeds, {"text_embeds": pooled, "time_ids": time_ids}


def _min_snr_weights(noise_scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ (Hang et al. 2023): weight min(SNR, γ)/SNR for ε targets, min(SNR, γ)/(SNR + 1) for v targets,
    so the many easy low-noise timesteps stop dominating the gradient."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps).float()
    clipped = torch.clamp(snr, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def render_validation(pipe: Any, opts: ImageOptions, seed: int, step: int, out_dir: Path,
                      device: torch.device) -> list[Path]:
    """Render each validation prompt with the adapters as they are now (fixed seed: images comparable across steps)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for module in [pipe.unet] + [m for _, m in text_encoders(pipe)]:
        module.eval()  # no LoRA dropout while rendering (and no draw from the global RNG)
    pipe.set_progress_bar_config(disable=True)
    paths = []
    for i, prompt in enumerate(opts.validation_prompts):
        image = pipe(prompt, num_inference_steps=opts.num_inference_steps, guidance_scale=opts.guidance_scale,
                     height=opts.resolution, width=opts.resolution,
                     generator=torch.Generator().manual_seed(seed + i)).images[0]
        path = out_dir / f"step-{step:06d}-{i}.png"
        image.save(path)
        paths.append(path)
    return paths


def _load_for_training(cfg: RunConfig, opts: ImageOptions, precision: str, device: torch.device) -> Any:
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError([Problem("precision", "fp16 mixed precision needs a CUDA GPU", value="fp16",
                                   allowed="auto, fp32, bf16", fix="use `precision: bf16` (or auto) on CPU")])
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.torch_dtype)
    if dtype is None:  # auto: fp32 on CPU; on a GPU the frozen base in the autocast dtype (half the memory)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32) \
            if device.type == "cuda" else torch.float32
    pipe = load_pipeline(cfg.base_model, dtype=dtype, base_config=opts.base_config)
    factor = pipe.vae_scale_factor
    if opts.resolution % factor:
        raise ConfigError([Problem("image.resolution", f"must be a multiple of the VAE's scale factor {factor}",
                                   value=opts.resolution, fix=f"use {opts.resolution // factor * factor or factor}")])
    # The VAE only encodes here; fp32 avoids the known fp16 overflow of SD VAEs and costs little.
    if pipe.vae.dtype != torch.float32:
        pipe.vae.to(torch.float32)
    pipe.to(device)
    pipe.vae.eval()
    for _, encoder in text_encoders(pipe):
        encoder.eval()
    return pipe


def _training_scheduler(pipe: Any, opts: ImageOptions) -> Any:
    """DDPM's forward process from the pipeline's own schedule; the objective from the config or the scheduler."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    if opts.prediction_type is not None:
        sched.register_to_config(prediction_type=opts.prediction_type)
        pipe.scheduler.register_to_config(prediction_type=opts.prediction_type)  # validation renders match
    return sched


def _write_run_json(run: _Run, n_images: int, n_trainable: int, seconds: float) -> None:
    """run.json: the header every run writes (status, versions, git sha), then what this image run did."""
    from loraforge.train.runinfo import run_header, write_run_json

    state = run.state
    write_run_json(run.run_dir, {
        **run_header(("torch", "diffusers", "transformers", "peft")),
        "task_type": run.cfg.task_type.value,
        "base_model": run.cfg.base_model,
        "global_step": state.global_step,
        "images": n_images,
        "views_per_epoch": len(run.views),
        "trainable_params": n_trainable,
        "precision": run.precision,
        "final_loss": state.history[-1]["loss"] if state.history else None,
        "seconds": round(seconds, 1),
    })


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def _mix(seed: int, index: int, stream: int) -> int:
    """A distinct, reproducible 63-bit seed per (run seed, index, purpose)."""
    return (seed * 1_000_003 + index * 7_919 + stream * 104_729) % 2**63
