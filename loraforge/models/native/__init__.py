"""Old remote-code checkpoints (ChatGLM2/3, Baichuan2-7B, Qwen-1) converted to native transformers models.

`NATIVE_FAMILIES` is the one registration point: a family module exports `FAMILY` (a `base.NativeFamily`).
`convert(src, out)` writes a plain Hugging Face folder (config, safetensors shards, fast tokenizer with chat
template, generation config, `loraforge_import.json`); `cached_convert(src)` does it once into the model cache,
keyed by the source files, as the GGUF import does. The converted config carries `loraforge_converted_from`
(the family name), so the rest of loraforge can translate the original module names.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from loraforge.errors import ModelError, Problem
from loraforge.models.native import baichuan, chatglm, qwen1
from loraforge.models.native.base import NativeFamily, original_leaf_names

NATIVE_FAMILIES: dict[str, NativeFamily] = {f.name: f for f in (chatglm.FAMILY, baichuan.FAMILY, qwen1.FAMILY)}

IMPORT_FILE = "loraforge_import.json"
CONVERTER_VERSION = 1
CONVERTED_KEY = "loraforge_converted_from"


def read_raw_config(model_dir: Path) -> dict | None:
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def family_of_checkpoint(raw: dict | None) -> NativeFamily | None:
    """The family whose *original* (remote-code) checkpoints `raw` belongs to; None for anything else."""
    if not raw or raw.get(CONVERTED_KEY):
        return None
    for fam in NATIVE_FAMILIES.values():
        if fam.claims(raw):
            return fam
    return None


def family_of_converted(hf_config) -> NativeFamily | None:
    """The family a converted model came from (its config's `loraforge_converted_from`)."""
    name = hf_config.get(CONVERTED_KEY) if isinstance(hf_config, dict) else getattr(hf_config, CONVERTED_KEY, None)
    return NATIVE_FAMILIES.get(name) if name else None


def needs_conversion(model_dir: Path) -> bool:
    """An original ChatGLM/Baichuan/Qwen-1 checkpoint with weights. A config-only folder is not converted:
    validate checks it against the registry's original module names (it needs no weights)."""
    from loraforge.models.native.shards import INDEX_NAMES, SINGLE_NAMES

    model_dir = Path(model_dir)
    has_weights = any((model_dir / n).is_file() for n in INDEX_NAMES + SINGLE_NAMES)
    return model_dir.is_dir() and has_weights and family_of_checkpoint(read_raw_config(model_dir)) is not None


def _refuse(fam: NativeFamily, raw: dict, src: Path) -> None:
    why = fam.refusal(raw, src)
    if why:
        raise ModelError([Problem("base_model", f"cannot convert this {fam.name} checkpoint: {why}", value=str(src),
                                  fix="use a checkpoint of a supported shape (see README, 'Old remote-code models')")])


def native_config_for(src: Path) -> tuple[NativeFamily, dict, dict]:
    """(family, native config.json dict, original config) from config.json alone — what validate needs."""
    src = Path(src)
    raw = read_raw_config(src)
    fam = family_of_checkpoint(raw)
    if fam is None:
        raise ModelError([Problem("base_model", "not a ChatGLM2/3, Baichuan-7B/Baichuan2-7B or Qwen-1 checkpoint",
                                  value=str(src))])
    _refuse(fam, raw, src)
    native = fam.native_config(raw, src)
    native[CONVERTED_KEY] = fam.name
    return fam, native, raw


def source_key(src: Path) -> str:
    """Names, sizes and mtimes of the source's files (and the converter version): the cache key."""
    src = Path(src).resolve()
    h = hashlib.sha256(f"{src}|v{CONVERTER_VERSION}".encode())
    for f in sorted(p for p in src.iterdir() if p.is_file()):
        st = f.stat()
        h.update(f"|{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def cached_convert(src: Path, cache_dir: Path) -> Path:
    """The converted folder for `src` under `cache_dir`, converting on first use (said on stderr)."""
    import sys

    src = Path(src)
    out = Path(cache_dir) / f"{src.resolve().name}-native-{source_key(src)}"
    if (out / IMPORT_FILE).is_file():
        return out
    fam = family_of_checkpoint(read_raw_config(src))
    print(f"loraforge: converting the {fam.name} checkpoint {src} to {fam.native_architecture} (once) → {out}",
          file=sys.stderr, flush=True)
    return convert(src, out)


def convert(src: str | Path, out: str | Path, *, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Convert the checkpoint in `src` into a native Hugging Face folder `out` (atomically replaced).

    Raises:
        ModelError: not a convertible checkpoint (with why), or weights that do not match its config.
    """
    from loraforge.atomic import atomic_dir
    from loraforge.models.native.base import convert_tensor
    from loraforge.models.native.shards import ShardWriter, iter_tensors, weight_files

    src, out = Path(src), Path(out)
    fam, native, raw = native_config_for(src)
    files = [f.name for f in weight_files(src)]
    expected = _expected_tensors(native)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        unknown, written = [], set()
        for name, tensor in iter_tensors(src):
            try:
                pieces = convert_tensor(fam, name, tensor, raw, native)
            except KeyError:
                unknown.append(name)
                continue
            for nname, t in pieces:
                writer.add(nname, t)
                written.add(nname)
            del tensor, pieces
        missing = sorted(expected - written)
        extra = sorted(written - expected)
        if unknown or missing or extra:
            raise ModelError([Problem("base_model", f"the {fam.name} checkpoint's weights do not match its config",
                                      value=str(src), allowed=f"unknown: {unknown[:5]}, missing: {missing[:5]}, "
                                      f"unexpected: {extra[:5]}", fix="check that every shard is complete")])
        shards = writer.close()
        (tmp / "config.json").write_text(json.dumps(native, indent=1))
        (tmp / "generation_config.json").write_text(json.dumps(fam.generation_config(raw, src, native), indent=1))
        fam.tokenizer(src, tmp, raw, native)
        record = {"format": f"native-from-{fam.name}", "family": fam.name, "variant": fam.variant(raw, src),
                  "source": str(src.resolve()), "source_key": source_key(src), "source_weight_files": files,
                  "converter_version": CONVERTER_VERSION, "native_architecture": fam.native_architecture,
                  "shards": shards, "notes": fam.notes(raw), "original_config": raw}
        (tmp / IMPORT_FILE).write_text(json.dumps(record, indent=1, ensure_ascii=False))
    return out


def _expected_tensors(native: dict) -> set[str]:
    """Parameter names of the native model, from a meta-device build of its config."""
    import torch
    import transformers

    cls = getattr(transformers, native["architectures"][0])
    config_cls = transformers.AutoConfig.for_model(native["model_type"]).__class__
    cfg = config_cls(**{k: v for k, v in native.items() if k not in ("model_type", "architectures", CONVERTED_KEY)})
    with torch.device("meta"):
        model = cls(cfg)
    return {n for n, _ in model.named_parameters()}


def import_record(model_dir: Path) -> dict | None:
    """The conversion record of a converted folder (None for any other folder)."""
    path = Path(model_dir) / IMPORT_FILE
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec if rec.get("family") in NATIVE_FAMILIES else None


def translate_targets(hf_config, targets):
    """`target_modules` written in the original checkpoint's names → native names, with a note per name.

    Returns (targets, notes). Names that are already native (or a regex / `all-linear`) pass unchanged.
    """
    fam = family_of_converted(hf_config)
    if fam is None or not isinstance(targets, (list, tuple)):
        return targets, []
    mapping = original_leaf_names(fam)
    native_leaves = {m.native.rsplit(".", 1)[-1] for m in fam.modules}
    out, notes = [], []
    for t in targets:
        if t in mapping and t not in native_leaves:
            new = mapping[t]
            notes.append(f"target_modules: `{t}` (the original {fam.name} name) is {', '.join(new)} in the "
                         f"converted {fam.native_architecture}")
            out.extend(n for n in new if n not in out)
        elif t not in out:
            out.append(t)
    return out, notes


def native_names_for_base(base_model: str | Path, leaf: str) -> set[str]:
    """The native leaf names an original leaf name becomes when `base_model` is (or converts to) a converted
    model; empty for any other base. Reads config.json only."""
    path = Path(str(base_model)).expanduser()
    raw = read_raw_config(path) if path.is_dir() else None
    fam = family_of_converted(raw) if raw else None
    if fam is None and needs_conversion(path):
        fam = family_of_checkpoint(raw)
    return set(original_leaf_names(fam).get(leaf, ())) if fam else set()


def original_names_hint(hf_config) -> str | None:
    """For a converted model: the original → native name table, for target_modules suggestions."""
    fam = family_of_converted(hf_config)
    if fam is None:
        return None
    return "; ".join(f"{k} → {', '.join(v)}" for k, v in original_leaf_names(fam).items()
                     if k not in ("input_layernorm", "post_attention_layernorm", "final_layernorm", "norm", "ln_1",
                                  "ln_2", "ln_f", "word_embeddings", "wte", "embed_tokens"))
