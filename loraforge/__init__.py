"""loraforge: config-driven fine-tuning of LLMs (LoRA, QLoRA, prefix/prompt tuning, freeze, full) and SD LoRA."""

__version__ = "0.1.0"
