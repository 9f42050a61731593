"""Optional back ends a `loraforge train` process leaves unimported when its run does not use them.

PEFT imports bitsandbytes whenever it is installed (`peft/helpers.py`), and bitsandbytes imports torch's inductor
compiler with it; transformers and accelerate import DeepSpeed whenever it is installed. Neither is used by a run
that is not QLoRA (or on a pre-quantized base) and not launched with DeepSpeed, and together they were ~1 s of the
~5.5 s from process start to the first training step of a SmolLM2 LoRA run (BENCHMARKS.md, start-up).

The command line hides them for its one run (`cli.train`), before anything imports transformers: a `None` entry in
`sys.modules` makes `import X` raise ImportError and `importlib.util.find_spec(X)` return None, so PEFT,
transformers and accelerate all see the package as not installed, consistently. The library's `train()` never does
this: a process that trains several runs (tests, notebooks, the web UI) may need them in a later one.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from loraforge.config import METHOD_OPTIONS, RunConfig, TaskType


def unused_backends(cfg: RunConfig, model_dir: Path | None) -> list[str]:
    """The optional packages this run does not need (whether installed or not)."""
    unused = []
    needed = METHOD_OPTIONS[cfg.method].packages
    if cfg.task_type is not TaskType.TEXT_TO_IMAGE and "bitsandbytes" not in needed and not _quantized(model_dir):
        unused.append("bitsandbytes")
    # `accelerate launch` with a DeepSpeed config tells its processes through this variable
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() not in ("1", "true", "yes"):
        unused.append("deepspeed")
    return unused


def hide(packages: list[str]) -> list[str]:
    """Make `packages` look not installed to this process (those not imported yet); returns the ones hidden."""
    hidden = [p for p in packages if p not in sys.modules]
    for p in hidden:
        sys.modules[p] = None  # type: ignore[assignment]  (the import system's own "not importable" marker)
    return hidden


def _quantized(model_dir: Path | None) -> bool:
    """A base saved quantized (bitsandbytes, GPTQ, ...) needs its quantizer's packages to load; unknown → True."""
    if model_dir is None:
        return True
    try:
        return "quantization_config" in json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
