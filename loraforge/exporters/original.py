"""`export --to original`: a LoRA run on a converted ChatGLM2/3, Baichuan2 or Qwen-1 base, written as an adapter
for the checkpoint's own remote-code model (its demos, chatglm.cpp …), loadable with `PeftModel.from_pretrained`;
a full/freeze run on such a base is written as a checkpoint in the original weight names and config.

The q/k/v (and any other split) LoRAs become one exact LoRA on the fused original weight (`query_key_value`,
`W_pack`, `c_attn`); the exactness is checked on the weight deltas as it is written (`models/native/original.py`).
"""

from __future__ import annotations

from loraforge.exporters.base import Exporter, ExportRequest, ExportResult, check_output


def _run(request: ExportRequest) -> ExportResult:
    from loraforge.exporters.source import resolve_run
    from loraforge.models.native import import_record
    from loraforge.models.native.original import converted_base_of_run, export_adapter, to_original_checkpoint

    source = resolve_run(request.run_dir, request.base)
    converted = source.model_dir if import_record(source.model_dir) else converted_base_of_run(request.run_dir)
    check_output(request)
    if source.adapter_dir is None:  # a full/freeze run is a complete model: its weights in the original names
        out = to_original_checkpoint(source.run_dir, converted, request.out)
        return ExportResult(out, sorted(out.iterdir()), [
            f"wrote the {source.method} run's model in the original layout to {out}",
            f"load it with the original code: AutoModel.from_pretrained({str(out)!r}, trust_remote_code=True)"])
    report = export_adapter(source.adapter_dir, converted, request.out)  # written atomically
    record = import_record(converted) or {}
    files = [request.out / n for n in ("adapter_model.safetensors", "adapter_config.json", "loraforge_export.json")]
    return ExportResult(request.out, files, [
        str(report),
        f"load it on the original model: PeftModel.from_pretrained(AutoModel.from_pretrained("
        f"{record.get('source') or '<original checkpoint>'!r}, trust_remote_code=True), {str(request.out)!r})"])


EXPORTER = Exporter("original", "a LoRA adapter for the original ChatGLM2/3, Baichuan2 or Qwen-1 code (fused "
                    "query_key_value / W_pack / c_attn, exact)", _run)
