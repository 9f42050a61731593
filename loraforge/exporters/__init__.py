"""Export targets: `loraforge export RUN_DIR --to NAME --out DIR`.

One module per target builds an `Exporter` (see `base.py`); this dict is the only list of them.
Nothing here imports torch: the CLI's help stays cheap.
"""

from __future__ import annotations

from pathlib import Path

from loraforge.errors import LoraforgeError, Problem, suggestion
from loraforge.exporters import gguf, gguf_lora, hf, ollama, original, vllm
from loraforge.exporters.base import Exporter, ExportRequest, ExportResult

EXPORTERS: dict[str, Exporter] = {e.name: e for e in (
    hf.EXPORTER, gguf.EXPORTER, ollama.EXPORTER, gguf_lora.EXPORTER, vllm.EXPORTER, original.EXPORTER)}


def export(run_dir: str | Path, to: str, out: str | Path, **options) -> ExportResult:
    """Run the `to` exporter on a run dir.

    Raises:
        LoraforgeError: an unknown target (with the list and a "did you mean"), or the target's own refusal.
    """
    if to not in EXPORTERS:
        raise LoraforgeError([Problem("--to", "unknown export target", value=to, allowed=", ".join(EXPORTERS),
                                      fix=suggestion(to, EXPORTERS))])
    from loraforge.train.rundir import base_model_dirs, check_output_path

    base = options.get("base")
    check_output_path(out, [run_dir, *(base_model_dirs(base) if base else [])])
    return EXPORTERS[to].run(ExportRequest(Path(run_dir), Path(out), **options))


__all__ = ["EXPORTERS", "Exporter", "ExportRequest", "ExportResult", "export"]
