"""`export --to hf`: the merged Hugging Face model dir (`loraforge merge`), verified from disk."""

from __future__ import annotations

from loraforge.exporters.base import Exporter, ExportRequest, ExportResult


def _run(request: ExportRequest) -> ExportResult:
    from loraforge.export import merge_adapter

    report = merge_adapter(request.run_dir, request.out, base=request.base, overwrite=request.overwrite)
    return ExportResult(request.out, [request.out], [report.format()])


EXPORTER = Exporter("hf", "merged Hugging Face model dir (safetensors + tokenizer + chat template), logits verified", _run)
