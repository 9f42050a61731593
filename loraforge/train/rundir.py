"""The run directory's own files (torch-free, so `preflight` checks the run-dir rules without the trainer)."""

# What a finished text run leaves in output_dir besides checkpoint-N/ folders: removed when overwriting, and the
# sign that a folder already holds a run.
RUN_ARTIFACTS = ("run.json", "metrics.jsonl", "loss.png", "tensorboard", "best", "adapter_config.json",
                 "adapter_model.safetensors", "config.yaml")
