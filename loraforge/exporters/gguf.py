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


def export_command(request: ExportRequest, target: str, quant: str) -> str:
    """The `loraforge export` command line that repeats `request` with another `--quant`."""
    import shlex

    args = ["loraforge", "export", str(request.run_dir), "--to", target, "--out", str(request.out), "--quant", quant]
    for flag, value in (("--base", request.base), ("--name", request.name)):
        if value:
            args += [flag, value]
    return shlex.join(args + (["--overwrite"] if request.overwrite else []))


def write_model_gguf(request: ExportRequest, out_dir: Path, *, target: str = "gguf") -> GgufModel:
    """Merge the run and write `out_dir/<name>-<quant>.gguf` (`out_dir` is the temporary twin of `request.out`).

    Raises:
        LoraforgeError: an unknown/unsupported quant type, an adapter that cannot be merged, or a family the
            writer does not convert (named, with the alternative).
    """
    import loraforge.exporters.gguf_model as gm
    from loraforge.exporters.gguf_vocab import add_tokenizer
    from loraforge.exporters.source import load_merged, require_mergeable, resolve_run, source_gguf

    name = model_name(request)
    quant = gm.check_quant(request.quant, out=request.out, name=name,
                           export_command=export_command(request, target, "f16"),
                           then=f" (then FROM ./{name}-{request.quant.upper()}.gguf in the Modelfile)"
                           if target == "ollama" else "")
    source = resolve_run(request.run_dir, request.base)
    require_mergeable(source, "gguf")
    from transformers import AutoConfig

    arch = gm.arch_for(AutoConfig.from_pretrained(source.model_dir).model_type)  # refuse before loading weights
    model, tokenizer = load_merged(source)
    chat_template, fmt, fmt_error = run_template(tokenizer, source.template)
    path = out_dir / f"{name}-{quant}.gguf"

    def metadata(writer: Any) -> None:
        gm.add_arch_metadata(writer, model.config, name=name)
        writer.add_file_type(gm.file_type(quant))
        writer.add_quantization_version(2)
        add_tokenizer(writer, tokenizer, family=model.config.model_type, n_vocab=model.config.vocab_size,
                      chat_template=chat_template, source_gguf=source_gguf(source.model_dir))

    gm.write_gguf(path, arch, metadata, gm.plan_model_tensors(model, arch, quant), progress=request.progress)
    return GgufModel(path, quant, fmt, chat_template, stop_tokens(tokenizer, source.template), fmt_error)


def model_name(request: ExportRequest) -> str:
    """The name in the file names and `general.name`: `--name`, else the run folder's."""
    return request.name or Path(request.run_dir).resolve().name


def _run(request: ExportRequest) -> ExportResult:
    from loraforge.exporters.gguf_model import quantize_command

    with output_dir(request) as tmp:
        model = write_model_gguf(request, Path(tmp))
    path = request.out / model.path.name
    lines = [f"wrote {path} ({model.quant}, {path.stat().st_size / 1e6:.1f} MB)",
             f"run it: llama-cli -m {path} -cnv   (chat template from the run is inside the file)"]
    if model.quant in ("f16", "bf16", "f32"):
        lines.append("k-quants (smaller, llama.cpp's quantizer): "
                     + quantize_command(request.out, model_name(request), "q4_k_m", source=model.quant))
    return ExportResult(request.out, [path], lines)


EXPORTER = Exporter("gguf", f"merged model as one GGUF for llama.cpp (--quant {'|'.join(QUANTS)}; "
                            f"{', '.join(q.upper() for q in LLAMA_QUANTIZE_ONLY[:3])}… via llama-quantize)", _run)
