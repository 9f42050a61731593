"""Merge a LoRA run into a standalone Hugging Face model dir, and prove the merge is exact.

`W' = W + (alpha / r) * B @ A` is folded into every adapted weight (PEFT `merge_and_unload`), so the result
loads in plain transformers with no PEFT and no extra latency. The merge always happens in 16/32-bit: a QLoRA
run's base is re-loaded unquantized, because merging into 4-bit weights would round the LoRA update away
(and re-quantize the whole matrix).

Verification reloads the saved dir from disk and compares its logits with base + adapter on a few chat
prompts; in float32 the largest difference must be <= 1e-4.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loraforge.atomic import atomic_dir
from loraforge.errors import LoraforgeError, ModelError, Problem

# Float32 merge error is ~1e-6 (summation order); 16-bit weights round each element to ~3 significant
# digits, so there the check is only a sanity bound.
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-1, "float16": 1e-1}
SAMPLE_PROMPTS = [
    "What are the symptoms of high blood pressure?",
    "Write one sentence about the sea.",
    "List three prime numbers.",
]


@dataclass
class MergeReport:
    """What `merge_adapter` did. `max_abs_diff` is None when verification was skipped."""

    out_dir: str
    run_dir: str
    base: str
    method: str
    dtype: str
    max_abs_diff: float | None
    tolerance: float
    samples: int
    seconds: float

    def __str__(self) -> str:
        return self.format()

    def format(self) -> str:
        check = ("not verified" if self.max_abs_diff is None else
                 f"verified: max |logits(merged) - logits(base+adapter)| = {self.max_abs_diff:.2e} "
                 f"(<= {self.tolerance:g}) on {self.samples} prompts")
        return (f"merged {self.run_dir} into {self.base} ({self.dtype}) -> {self.out_dir}\n{check}\n"
                f"load it with: AutoModelForCausalLM.from_pretrained({self.out_dir!r})")


def merge_adapter(run_dir: str | Path, out_dir: str | Path, *, base: str | Path | None = None,
                  dtype: str = "float32", verify: bool = True, overwrite: bool = False) -> MergeReport:
    """Fold a LoRA adapter into its base model and save a standalone HF model dir.

    Args:
        run_dir: a LoRA/QLoRA run's output_dir (or a checkpoint-N dir inside it).
        out_dir: where the merged model goes (safetensors, tokenizer with chat template, generation config).
        base: the base model; default: `base_model` from run_dir/config.yaml, else the adapter's own record.
        dtype: float32 (default; exact), bfloat16 or float16.
        verify: reload the saved model and compare logits with base + adapter.
        overwrite: replace an existing non-empty out_dir.

    Raises:
        LoraforgeError: a full/freeze run (nothing to merge), a prompt-learning adapter (cannot be merged),
            an unknown dtype, out_dir not empty, or a merge that fails verification.
    """
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.inference import read_run_config, render_prompt_ids, resolve_adapter_path
    from loraforge.methods import METHODS
    from loraforge.models.gguf import resolve_model_path

    start = time.perf_counter()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise LoraforgeError([Problem("dtype", "unknown merge dtype", value=dtype, allowed=", ".join(dtypes))])
    run_cfg = read_run_config(run_dir)
    method = str(run_cfg.get("method") or "lora")
    record = METHODS.get(method)  # None: a run of a method this installation does not know; its files decide
    saves_model = record is not None and not record.saves_adapter
    if saves_model or (not (run_dir / "adapter_config.json").is_file() and (run_dir / "config.json").is_file()):
        raise LoraforgeError([Problem("run_dir", f"a {method if saves_model else 'full/freeze'} run already "
                                      "is a complete model: there is no adapter to merge", value=str(run_dir),
                                      fix=f"use the folder directly: AutoModelForCausalLM.from_pretrained({str(run_dir)!r}) "
                                          f"or loraforge chat --base {run_dir}")], title="nothing to merge")
    adapter_dir = resolve_adapter_path(run_dir, key="run_dir")
    peft_config = PeftConfig.from_pretrained(str(adapter_dir))
    peft_type = str(getattr(peft_config.peft_type, "value", peft_config.peft_type))
    if peft_config.is_prompt_learning:
        raise LoraforgeError([Problem("run_dir", f"a {peft_type} adapter cannot be merged: it adds virtual tokens / "
                                      "past key-values at run time instead of changing weights", value=str(run_dir),
                                      allowed="LoRA and QLoRA runs",
                                      fix=f"serve it as an adapter: loraforge chat --base BASE --adapter name={run_dir}")],
                             title="cannot merge")
    if peft_type != "LORA":
        raise LoraforgeError([Problem("run_dir", "only LoRA adapters can be merged", value=peft_type, allowed="LORA")],
                             title="cannot merge")
    base_name = base or run_cfg.get("base_model") or peft_config.base_model_name_or_path
    if not base_name:
        raise ModelError([Problem("base", "the run does not record its base model", value=str(run_dir),
                                  fix="pass the base explicitly: loraforge merge RUN_DIR --out DIR --base MODEL")])
    base_path = resolve_model_path(base_name)
    from loraforge.models.fit import check_adapter_fits

    check_adapter_fits(adapter_dir, base_path, key="run_dir")
    if record is not None and record.quantizes_base:
        warnings.warn(f"QLoRA run: merging into an unquantized {dtype} copy of {base_path}, not into 4-bit weights "
                      "(that would round the LoRA update away)", stacklevel=2)
    _check_out_dir(out_dir, [base_path, run_dir, adapter_dir], overwrite)

    # Tokenizer: the run's copy carries the chat template used in training.
    tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_path
    tokenizer = AutoTokenizer.from_pretrained(tok_src)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtypes[dtype])  # never quantized here
    model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    samples = _sample_batch(tokenizer, render_prompt_ids, str(run_cfg.get("template") or "auto"))
    with torch.inference_mode():
        reference = model(**samples).logits.float() if verify else None
        merged = model.merge_and_unload()

    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if merged.generation_config is not None:
            merged.generation_config.save_pretrained(tmp)
        max_diff = None
        if verify:
            reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtypes[dtype]).eval()
            with torch.inference_mode():
                got = reloaded(**samples).logits.float()
            mask = samples["attention_mask"].bool()
            max_diff = float((got - reference).abs()[mask].max())
            if max_diff > TOLERANCE[dtype]:
                raise LoraforgeError([Problem("merge", "merged model's logits differ from base + adapter", value=max_diff,
                                              allowed=f"<= {TOLERANCE[dtype]:g}",
                                              fix="report this with the run's config.yaml; try dtype float32")],
                                     title="merge verification failed")
        report = MergeReport(out_dir=str(out_dir), run_dir=str(run_dir), base=str(base_path), method=method,
                             dtype=dtype, max_abs_diff=max_diff, tolerance=TOLERANCE[dtype],
                             samples=int(samples["input_ids"].shape[0]), seconds=0.0)
        report.seconds = round(time.perf_counter() - start, 2)
        (tmp / "loraforge_merge.json").write_text(json.dumps(asdict(report), indent=1), encoding="utf-8")
    return report


def _check_out_dir(out_dir: Path, sources: list[Path], overwrite: bool) -> None:
    """Never into the base or the run being merged; a non-empty folder only with overwrite, and then only one a
    previous merge wrote (another model's folder is never replaced).

    Raises:
        LoraforgeError: naming the folder and the fix.
    """
    from loraforge.train.rundir import is_inside, is_model_folder, output_path_problems, writable_dir_problem

    for src in sources:
        if is_inside(out_dir, src) or is_inside(src, out_dir):
            raise LoraforgeError([Problem("out", f"overlaps {src}, which the merge reads: it would be overwritten",
                                          value=str(out_dir), fix="choose a new folder outside the base and the run")])
    if inside_model := output_path_problems(out_dir, [], key="out", replaces=False):
        raise LoraforgeError(inside_model)
    if (problem := writable_dir_problem(out_dir, "out")) is not None:
        raise LoraforgeError([problem])
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise LoraforgeError([Problem("out", "output folder exists and is not empty", value=str(out_dir),
                                          fix="choose a new folder, or replace it: loraforge merge ... --overwrite")])
        if is_model_folder(out_dir) and not (out_dir / "loraforge_merge.json").is_file() or \
                (out_dir / "run.json").is_file():
            raise LoraforgeError([Problem("out", "is a model or run folder that `loraforge merge` did not write: "
                                                 "--overwrite only replaces an earlier merge", value=str(out_dir),
                                          fix="choose a new folder")])


def _sample_batch(tokenizer: Any, render: Any, template: str) -> dict[str, Any]:
    """Right-padded chat prompts with an attention mask (padding positions are excluded from the check)."""
    import torch

    rows = [render(tokenizer, [{"role": "user", "content": p}], template) for p in SAMPLE_PROMPTS]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}
