"""`export --to gguf`: the merged model (or a full/freeze run's model) as one GGUF file for llama.cpp.

The file carries llama.cpp's architecture metadata, the tokenizer (vocabulary, merges, special ids, add-BOS/EOS)
and, in `tokenizer.chat_template`, the template the run trained with: the tokenizer's own for `template: auto`,
else the built-in template (`chatml`…) written as Jinja — so llama.cpp's chat mode formats prompts as training did.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraforge.exporters.base import Exporter, ExportRequest, ExportResult, output_dir
from loraforge.exporters.gguf_model import LLAMA_QUANTIZE_ONLY, QUANTS


@dataclass
class GgufModel:
    """An exported GGUF and what went into it (the Ollama target reuses it)."""

    path: Path
    quant: str
    chat_format: Any  # chat_format.ChatFormat, or None when the template could not be cut into blocks
    chat_template: str
    stop_tokens: list[str]
    chat_format_error: Exception | None = None  # why chat_format is None


def run_template(tokenizer: Any, template: str) -> tuple[str, Any, Exception | None]:
    """(Jinja chat template for the GGUF, ChatFormat or None, why None) for the run's `template` setting.

    Raises:
        LoraforgeError: a built-in template that has no per-message blocks (it then has no Jinja form either).
    """
    from loraforge.data.templates import resolve_template
    from loraforge.errors import LoraforgeError
    from loraforge.exporters.chat_format import decompose, jinja_template, run_render

    name = resolve_template(tokenizer, template)
    fmt, error = None, None
    try:
        fmt = decompose(run_render(tokenizer, template), what=f"the run's template ({name})")
    except LoraforgeError as e:
        if name != "auto":
            raise
        error = e  # the tokenizer's Jinja still goes into the GGUF as it is; only Ollama needs the blocks
    chat_template = tokenizer.chat_template if name == "auto" else jinja_template(fmt)
    if not isinstance(chat_template, str):
        chat_template = dict(chat_template).get("default") or next(iter(dict(chat_template).values()))
    return chat_template, fmt, error


def stop_tokens(tokenizer: Any, template: str) -> list[str]:
    """The end-of-turn tokens as text (`<|im_end|>`…), EOS first: what llama.cpp / Ollama must stop on."""
    from loraforge.data.templates import stop_token_ids

    return list(dict.fromkeys(tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer, template))))


def write_model_gguf(request: ExportRequest, out_dir: Path) -> GgufModel:
    """Merge the run and write `out_dir/<name>-<quant>.gguf`.

    Raises:
        LoraforgeError: an unknown/unsupported quant type, an adapter that cannot be merged, or a family the
            writer does not convert (named, with the alternative).
    """
    import loraforge.exporters.gguf_model as gm
    from loraforge.exporters.gguf_vocab import add_tokenizer
    from loraforge.exporters.source import load_merged, require_mergeable, resolve_run, source_gguf

    quant = gm.check_quant(request.quant)
    source = resolve_run(request.run_dir, request.base)
    require_mergeable(source, "gguf")
    from transformers import AutoConfig

    arch = gm.arch_for(AutoConfig.from_pretrained(source.model_dir).model_type)  # refuse before loading weights
    model, tokenizer = load_merged(source)
    chat_template, fmt, fmt_error = run_template(tokenizer, source.template)
    name = request.name or source.run_dir.resolve().name
    path = out_dir / f"{name}-{quant}.gguf"

    def metadata(writer: Any) -> None:
        gm.add_arch_metadata(writer, model.config, name=name)
        writer.add_file_type(gm.file_type(quant))
        writer.add_quantization_version(2)
        add_tokenizer(writer, tokenizer, family=model.config.model_type, n_vocab=model.config.vocab_size,
                      chat_template=chat_template, source_gguf=source_gguf(source.model_dir))

    gm.write_gguf(path, arch, metadata, gm.plan_model_tensors(model, arch, quant), progress=request.progress)
    return GgufModel(path, quant, fmt, chat_template, stop_tokens(tokenizer, source.template), fmt_error)


def _run(request: ExportRequest) -> ExportResult:
    with output_dir(request) as tmp:
        model = write_model_gguf(request, Path(tmp))
    path = request.out / model.path.name
    lines = [f"wrote {path} ({model.quant}, {path.stat().st_size / 1e6:.1f} MB)",
             f"run it: llama-cli -m {path} -cnv   (chat template from the run is inside the file)"]
    if model.quant in ("f16", "bf16", "f32"):
        lines.append(f"smaller k-quants: llama-quantize {path} {request.out}/{path.stem.rsplit('-', 1)[0]}-Q4_K_M.gguf Q4_K_M")
    return ExportResult(request.out, [path], lines)


EXPORTER = Exporter("gguf", f"merged model as one GGUF for llama.cpp (--quant {'|'.join(QUANTS)}; "
                            f"{', '.join(q.upper() for q in LLAMA_QUANTIZE_ONLY[:3])}… via llama-quantize)", _run)
