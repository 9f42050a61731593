"""Stable Diffusion LoRA with diffusers: the `task_type: text-to-image` (alias `image-to-image`) recipe.

Entry points (each module imports torch/diffusers only when loaded):
- `loraforge.image.train.train_image_lora(cfg) -> Path` — train; the run dir is a diffusers LoRA dir.
- `loraforge.image.generate.generate_image(base, prompt, loras=..., init_image=...) -> PIL.Image`.
- `loraforge.image.kohya.export_kohya(lora_dir, out_file, alpha=None) -> Path` — kohya/A1111 keys, true alpha.
- `loraforge.image.tiny.tiny_pipeline_dir(root) -> Path` — a tiny random SD pipeline for tests.
- `loraforge.image.data.collect_examples(...)` — caption folders / metadata.jsonl, checked up front.
"""
