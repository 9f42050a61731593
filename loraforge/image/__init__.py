"""Stable Diffusion LoRA with diffusers: the `task_type: text-to-image` (alias `image-to-image`) recipe.

Entry points (each module imports torch/diffusers only when loaded; see docs/IMAGE.md):
- `train.train_image_lora(cfg) -> Path` — train; the run dir is a diffusers LoRA dir (SD 1.x / 2.x / SDXL).
- `generate.generate_image(base, prompt, loras=[(path, weight)], init_image=...) -> PIL.Image`.
- `kohya.export_kohya(lora_dir, out_file, alpha=None) -> Path` — kohya/A1111 keys with the true alpha.
- `preflight.check_image_run(cfg) -> list[Problem]` — data, pipeline layout, resolution, targets; no weights.
- `data.collect_examples(...)` — caption folders (kohya `N_name` repeats) or metadata.jsonl, checked up front.
- `tiny.tiny_pipeline_dir(root)`, `tiny.tiny_sdxl_pipeline_dir(root)` — tiny random pipelines for tests.
"""
