"""A model's `config.json` and the transformers Auto class for each task type.

Both `discovery` (building on the meta device) and `loader` (reading weights) start from these facts, so they
live here, below both, and neither of those modules imports the other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loraforge.config.schema import TaskType
from loraforge.errors import ModelError, Problem, suggestion
from loraforge.models.registry import family_for

AUTO_CLASSES: dict[TaskType, str] = {
    TaskType.CAUSAL_LM: "AutoModelForCausalLM",
    TaskType.SEQ_2_SEQ_LM: "AutoModelForSeq2SeqLM",
    TaskType.SEQ_CLS: "AutoModelForSequenceClassification",
    TaskType.TOKEN_CLS: "AutoModelForTokenClassification",
    TaskType.QUESTION_ANSWERING: "AutoModelForQuestionAnswering",
    TaskType.FEATURE_EXTRACTION: "AutoModel",
}


def is_remote_placeholder(hf_config: Any) -> bool:
    """True for a config we could only read as plain JSON (its remote code is unavailable or not trusted)."""
    from transformers import PreTrainedConfig

    return type(hf_config) is PreTrainedConfig


def load_hf_config(model_dir: str | Path, trust_remote_code: bool = False) -> Any:
    """The model's config, read from `model_dir/config.json` (or a built-in name).

    For a remote-code checkpoint whose code cannot run (trust_remote_code off, code files absent, or code that
    needs an older transformers) this returns a plain `PreTrainedConfig` holding the JSON fields, so the kind,
    family and registry module names can still be checked; building or loading the model then fails clearly.

    Raises:
        ModelError: no such model, no config.json, or a `model_type` transformers does not know.
    """
    from transformers import AutoConfig, PreTrainedConfig

    from loraforge.models.gguf import resolve_model_path

    path = resolve_model_path(model_dir)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelError([Problem("base_model", "folder has no config.json", value=str(path),
                                  fix="point base_model at a Hugging Face model folder")])
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, ImportError, AttributeError, TypeError) as err:
        raw = json.loads(cfg_file.read_text())
        if raw.get("auto_map") or family_for(raw) is not None:
            # Remote-code checkpoint: keep its fields for registry-based checks.
            return PreTrainedConfig(**raw)
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        model_type = raw.get("model_type")
        raise ModelError([Problem(
            f"{cfg_file}:model_type", f"transformers cannot read this config: {str(err).splitlines()[0]}",
            value=model_type, allowed="a model_type known to the installed transformers",
            fix=suggestion(str(model_type), CONFIG_MAPPING_NAMES) or "check config.json")]) from None


def remote_code_problem(hf_config: Any, trust_remote_code: bool) -> Problem:
    """Why a remote-code checkpoint cannot be built here: its code is not trusted, or it does not run."""
    fam = family_for(hf_config)
    name = fam.name if fam else getattr(hf_config, "model_type", "?")
    if not trust_remote_code:
        return Problem("trust_remote_code", f"`{name}` models run their own Python code from the checkpoint",
                       value=False, allowed="true to run the checkpoint's code",
                       fix="set `trust_remote_code: true` if you trust this checkpoint")
    return Problem("base_model", f"the `{name}` checkpoint's own code could not be loaded (its .py files are "
                   "missing or need an older transformers; ChatGLM2/3's need transformers < 4.42)",
                   value=name, fix="ChatGLM2/3, Baichuan2-7B and Qwen-1 checkpoint dirs are converted to native "
                   "models automatically (`loraforge convert`); for others use the native transformers port of the "
                   "model (e.g. the `-hf` checkpoints of GLM-4) or the transformers version the code was written for")
