"""`export --to gguf`: the merged model (or a full/freeze run's model) as one GGUF file for llama.cpp.

The file carries llama.cpp's architecture metadata, the tokenizer (vocabulary, merges, special ids, add-BOS/EOS)
and, in `tokenizer.chat_template`, the template the run trained with: the tokenizer's own for `template: auto`,
else the built-in template (`chatml`…) written as Jinja — so llama.cpp's chat mode formats prompts as training did.
"""

from __future__ import annotations

import json
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


def export_command(request: ExportRequest, target: str, quant: str | None = None) -> str:
    """The `loraforge export` command line that repeats `request` --to `target` (with `--quant`); --to hf
    writes next to --out, in `<out>-hf`."""
    import shlex

    out = request.out.with_name(request.out.name + "-hf") if target == "hf" else request.out
    args = ["loraforge", "export", str(request.run_dir), "--to", target, "--out", str(out)]
    args += ["--quant", quant] if quant else []
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
    from transformers import AutoConfig

    import loraforge.exporters.gguf_model as gm
    from loraforge.exporters.gguf_vocab import add_tokenizer
    from loraforge.exporters.source import load_merged, require_mergeable, resolve_run, source_gguf

    name = model_name(request)
    quant = gm.check_quant(request.quant, out=request.out, name=name,
                           export_command=export_command(request, target, "f16"),
                           then=f" (then FROM ./{name}-{request.quant.upper()}.gguf in the Modelfile)"
                           if target == "ollama" else "")
    source = converted_source(resolve_run(request.run_dir, request.base))
    require_mergeable(source, "gguf")
    raw = json.loads((source.model_dir / "config.json").read_text(encoding="utf-8"))
    arch = gm.arch_of_config(raw, hf_route=hf_route(request, name))  # refuse before loading weights
    gm.check_config(AutoConfig.from_pretrained(source.model_dir))
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


def converted_source(source: Any) -> Any:
    """An original ChatGLM2/3 / Baichuan2 / Qwen-1 checkpoint given as the model itself → its native conversion
    (cached, as when it is a run's base): Baichuan2 is then a `llama` model and Qwen-1 a `qwen2` one."""
    from dataclasses import replace

    from loraforge.models.gguf import resolve_model_path
    from loraforge.models.native import needs_conversion

    if source.adapter_dir is not None or not needs_conversion(source.model_dir):
        return source
    converted = resolve_model_path(source.model_dir)
    return replace(source, run_dir=converted, model_dir=converted)


def hf_route(request: ExportRequest, name: str) -> str:
    """This export done by llama.cpp's converter instead: merged HF folder next to --out, then convert_hf_to_gguf."""
    import shlex

    merged = request.out.with_name(request.out.name + "-hf")
    return (f"{export_command(request, 'hf')} && mkdir -p {shlex.quote(str(request.out))} && "
            f"python convert_hf_to_gguf.py {shlex.quote(str(merged))} "
            f"--outfile {shlex.quote(str(request.out / f'{name}-f16.gguf'))} --outtype f16")


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
