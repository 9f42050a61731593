"""What an export reads from a run: the run's config, its adapter (or complete model), base and tokenizer.

An adapter run is merged in place (`merge_and_unload` folds `B @ A * scale` into each base weight and drops
the LoRA modules), so an export holds one copy of the model; a full/freeze run already is the model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraforge.errors import LoraforgeError, ModelError, Problem


@dataclass
class RunSource:
    """A run, resolved: `adapter_dir` is None for a full/freeze run (then `model_dir` is the run itself)."""

    run_dir: Path
    run_cfg: dict[str, Any]
    method: str
    template: str
    model_dir: Path  # the base model for an adapter run, the run's own model otherwise
    adapter_dir: Path | None
    peft_config: Any = None

    @property
    def tokenizer_dir(self) -> Path:
        """The run's copy of the tokenizer carries the chat template used in training."""
        for d in (self.adapter_dir, self.run_dir):
            if d is not None and (d / "tokenizer_config.json").is_file():
                return d
        return self.model_dir


def resolve_run(run_dir: Path, base: str | None = None) -> RunSource:
    """Read a run dir without loading weights.

    Raises:
        LoraforgeError: not a run dir, or a base that cannot be found.
    """
    from loraforge.inference import read_run_config, resolve_adapter_path
    from loraforge.models.gguf import resolve_model_path

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LoraforgeError([Problem("run_dir", "not a folder", value=str(run_dir),
                                      fix="pass a run's output_dir (it holds config.yaml and the adapter or model)")])
    run_cfg = read_run_config(run_dir)
    method = str(run_cfg.get("method") or "lora")
    template = str(run_cfg.get("template") or "auto")
    if not (run_dir / "adapter_config.json").is_file() and (run_dir / "config.json").is_file():
        return RunSource(run_dir, run_cfg, method, template, model_dir=run_dir, adapter_dir=None)
    from peft import PeftConfig

    adapter_dir = resolve_adapter_path(run_dir, key="run_dir")
    peft_config = PeftConfig.from_pretrained(str(adapter_dir))
    base_name = base or run_cfg.get("base_model") or peft_config.base_model_name_or_path
    if not base_name:
        raise ModelError([Problem("base", "the run does not record its base model", value=str(run_dir),
                                  fix="pass it: loraforge export RUN_DIR --to ... --base MODEL")])
    return RunSource(run_dir, run_cfg, method, template, model_dir=resolve_model_path(base_name),
                     adapter_dir=adapter_dir, peft_config=peft_config)


def peft_type(source: RunSource) -> str | None:
    if source.peft_config is None:
        return None
    return str(getattr(source.peft_config.peft_type, "value", source.peft_config.peft_type))


def require_mergeable(source: RunSource, target: str) -> None:
    """A LoRA adapter (or a complete model) can become one set of weights; virtual-token methods cannot.

    Raises:
        LoraforgeError: a prompt-learning adapter or a non-LoRA PEFT type.
    """
    kind = peft_type(source)
    if kind is None or kind == "LORA":
        return
    why = ("it adds virtual tokens / past key-values at run time instead of changing weights"
           if source.peft_config.is_prompt_learning else "only LoRA adapters are merged")
    raise LoraforgeError([Problem("run_dir", f"a {kind} adapter cannot be exported --to {target}: {why}",
                                  value=str(source.run_dir), allowed="LoRA/QLoRA, full and freeze runs",
                                  fix=f"serve it as an adapter: loraforge serve --adapter name={source.run_dir}")],
                         title=f"cannot export --to {target}")


def load_merged(source: RunSource) -> tuple[Any, Any]:
    """(model, tokenizer) in float32 with any adapter merged in; one copy of the weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.methods import METHODS

    tokenizer = AutoTokenizer.from_pretrained(source.tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(source.model_dir, dtype=torch.float32)
    if source.adapter_dir is not None:
        from peft import PeftModel

        record = METHODS.get(source.method)
        if record is not None and record.quantizes_base:
            warnings.warn(f"QLoRA run: merging into an unquantized float32 copy of {source.model_dir}, not into 4-bit "
                          "weights (that would round the LoRA update away)", stacklevel=2)
        model = PeftModel.from_pretrained(model, str(source.adapter_dir)).merge_and_unload()
    return model.eval(), tokenizer


def source_gguf(model_dir: Path) -> Path | None:
    """The GGUF file a base was imported from (`loraforge import-gguf` / the built-in SmolLM2), if any."""
    import json

    record = model_dir / "loraforge_import.json"
    if not record.is_file():
        return None
    path = Path(json.loads(record.read_text(encoding="utf-8")).get("source") or "")
    return path if path.is_file() else None
