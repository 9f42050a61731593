"""Train / validation sets from a RunConfig: read → check → split → encode → (cache).

The recipe, top to bottom, for CAUSAL_LM:
1. `resolve_train_files` + `load_conversations` (every bad line reported at once);
2. hold out `val_size` rows (seeded by `cfg.seed`) or read `val_file`;
3. `encode_conversation` each row, then apply `overlong` (truncate or drop) — both counted in `DataStats`;
4. write the result to ``cache_root()/tokenized/<key>/bundle.json`` when `tokenized_cache` is on. The key hashes
   the data files' bytes, the tokenizer (vocabulary, special tokens, chat template) and every encoding option,
   so any change re-encodes and an unchanged run skips tokenization.

The other task types' rows are read by `tasks.py` (which uses the split helpers here); which builder a run uses is
its objective's choice (`loraforge/objectives/`), made in that one place.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraforge.atomic import atomic_open
from loraforge.data.checks import DataStats, length_percentiles
from loraforge.data.formats import Message, load_conversations, resolve_train_files
from loraforge.data.templates import Encoded, encode_conversation, tokenization_matches, truncate
from loraforge.errors import DataError, LoraforgeError, Problem

CACHE_FORMAT = 1  # bump when the encoding or the file layout changes: old cache entries are then ignored


@dataclass
class DataBundle:
    """The encoded data a training run needs."""

    train: list[Encoded]
    val: list[Encoded] | None
    stats: DataStats
    cache_hit: bool = False  # True when this bundle was read from the tokenized cache


def build_datasets(cfg: Any, tokenizer: Any) -> DataBundle:
    """Encoded CAUSAL_LM train (and validation) examples for `cfg`, from the cache when possible.

    Raises:
        DataError: missing files, bad rows (all listed), a bad split, no usable example, or a config of another
            task type (its rows are read by `loraforge.objectives.build_data`, through its objective).
    """
    task = getattr(cfg.task_type, "value", cfg.task_type)
    if task != "CAUSAL_LM":
        raise DataError([Problem("task_type", "build_datasets reads chat / alpaca rows for CAUSAL_LM only",
                                 value=task, allowed="CAUSAL_LM",
                                 fix="build the data of other task types with "
                                     "`loraforge.objectives.build_data(cfg, tokenizer)`")])
    return _build_causal_lm(cfg, tokenizer)


def _build_causal_lm(cfg: Any, tokenizer: Any) -> DataBundle:
    files = resolve_train_files(cfg)
    val_file = check_val_options(cfg)
    cache_dir = None
    if cfg.tokenized_cache:
        cache_dir = tokenized_cache_dir(cfg, tokenizer, files, val_file)
        cached = _read_cache(cache_dir)
        if cached is not None:
            return cached

    train_rows, val_rows = _load_rows(cfg, files, val_file)
    if cfg.val_size > 0:
        train_rows, val_rows = split_rows(train_rows, cfg.val_size, cfg.seed)
    if train_rows and not tokenization_matches(tokenizer, train_rows[0][1], cfg.template):
        warnings.warn(f"template `{cfg.template}`: tokenizing prompt and reply separately differs from tokenizing the "
                      "whole text (a BPE merge across a turn border); loraforge's own inference matches training, "
                      "engines that tokenize the full text may differ slightly", stacklevel=2)

    stats = DataStats(files=[str(f) for f in files], cutoff_len=cfg.cutoff_len, overlong=cfg.overlong)
    train, lengths = _encode_all(cfg, tokenizer, train_rows, stats)
    stats.examples = len(train)
    stats.trained_tokens = sum(e.trained_tokens for e in train)
    stats.total_tokens = sum(len(e) for e in train)
    for key, value in length_percentiles(lengths).items():
        setattr(stats, key, value)
    if not train:
        raise DataError([Problem("cutoff_len", f"no usable training example: all {len(train_rows)} were dropped "
                                 f"({stats.over_cutoff} longer than cutoff_len)", value=cfg.cutoff_len,
                                 fix=f"raise cutoff_len (longest example: {stats.max} tokens) or use "
                                 "`overlong: truncate`")])
    val = None
    if val_rows is not None:
        val, _ = _encode_all(cfg, tokenizer, val_rows, DataStats())
        stats.val_examples = len(val)
        if not val:
            raise DataError([Problem("val_file" if val_file else "val_size", "no usable validation example "
                                     "(all longer than cutoff_len)", fix="raise cutoff_len")])
    bundle = DataBundle(train, val, stats)
    if cache_dir is not None:
        _write_cache(cache_dir, bundle)
    return bundle


# ---------------------------------------------------------------------------------------------- steps


def check_val_options(cfg: Any) -> Path | None:
    """The validation file to read (None without one), after checking `val_file` / `val_size`.

    Raises:
        DataError: both are set, a fractional count, or a missing file.
    """
    if cfg.val_file is not None and cfg.val_size > 0:
        raise DataError([Problem("val_size", "both `val_file` and `val_size` are set", value=cfg.val_size,
                                 fix="remove `val_size` to validate on val_file, or remove `val_file` to hold out rows")])
    if cfg.val_size >= 1 and cfg.val_size != int(cfg.val_size):
        raise DataError([Problem("val_size", "a count of validation rows must be a whole number", value=cfg.val_size,
                                 allowed="a fraction < 1 (e.g. 0.1) or a whole count ≥ 1")])
    if cfg.val_file is None:
        return None
    path = Path(cfg.val_file)
    if not path.is_file():
        raise DataError([Problem("val_file", "validation data file not found", value=str(path),
                                 fix="point val_file at an existing .jsonl / .json / .csv file")])
    return path


def _load_rows(cfg: Any, files: list[Path], val_file: Path | None):
    """Train and validation conversations; problems in both files are reported together."""
    problems: list[Problem] = []
    train_rows: list[tuple[str, list[Message]]] = []
    val_rows = None
    try:
        train_rows = load_conversations(files, cfg.system_prompt)
    except LoraforgeError as e:
        problems += e.problems
    if val_file is not None:
        try:
            val_rows = load_conversations([val_file], cfg.system_prompt)
        except LoraforgeError as e:
            problems += e.problems
    if problems:
        raise DataError(problems)
    return train_rows, val_rows


def split_rows(rows: list, val_size: float, seed: int) -> tuple[list, list]:
    """Hold out `val_size` rows (a fraction < 1, rounded, at least 1; or a count ≥ 1), chosen with `seed`.
    Both parts keep file order.

    Raises:
        DataError: the split would leave no training row.
    """
    n = len(rows)
    count = max(1, round(n * val_size)) if val_size < 1 else int(val_size)
    if count >= n:
        raise DataError([Problem("val_size", f"holding out {count} of {n} rows leaves none to train on",
                                 value=val_size, fix=f"use a fraction like 0.1 or a count below {n}")])
    picked = set(random.Random(f"loraforge-val:{seed}").sample(range(n), count))
    return [r for i, r in enumerate(rows) if i not in picked], [r for i, r in enumerate(rows) if i in picked]


def _encode_all(cfg: Any, tokenizer: Any, rows: list[tuple[str, list[Message]]],
                stats: DataStats) -> tuple[list[Encoded], list[int]]:
    """Encode rows, apply `overlong`; counts go to `stats`. Returns (kept examples, full lengths of all rows)."""
    kept: list[Encoded] = []
    lengths: list[int] = []
    for source, messages in rows:
        # Encode in full first so the length percentiles describe the data, not the cutoff.
        full, _ = encode_conversation(tokenizer, messages, template=cfg.template, cutoff_len=sys.maxsize,
                                      train_on_prompt=cfg.train_on_prompt, source=source)
        lengths.append(len(full))
        if len(full) > cfg.cutoff_len:
            stats.over_cutoff += 1
            if cfg.overlong == "drop":
                stats.dropped += 1
                continue
        encoded, was_cut = truncate(full, cfg.cutoff_len)
        if encoded.trained_tokens == 0:  # the prompt alone fills cutoff_len: nothing left to learn from
            stats.dropped += 1
            continue
        stats.truncated += was_cut
        kept.append(encoded)
    return kept, lengths


# ---------------------------------------------------------------------------------------------- cache


def tokenized_cache_dir(cfg: Any, tokenizer: Any, files: list[Path], val_file: Path | None,
                        rows: str | None = None) -> Path:
    """``cache_root()/tokenized/<key>``: the key changes with the data bytes, the tokenizer and any option that
    changes the encoding or the split. `rows` names another kind of encoded rows than SFT's (preference pairs,
    KTO rows): it enters the key, so one data file read as both never shares an entry."""
    from loraforge.models.gguf import cache_root

    h = hashlib.sha256()
    options = {
        "format": CACHE_FORMAT, "task_type": str(getattr(cfg.task_type, "value", cfg.task_type)),
        "template": cfg.template, "cutoff_len": cfg.cutoff_len, "overlong": cfg.overlong,
        "train_on_prompt": cfg.train_on_prompt, "system_prompt": cfg.system_prompt, "val_size": cfg.val_size,
        "seed": cfg.seed if cfg.val_size > 0 else None,  # the seed only matters for a held-out split
    }
    if rows is not None:  # SFT keys stay as they were
        options["rows"] = rows
    h.update(json.dumps(options, sort_keys=True).encode())
    for label, path in [("train", f) for f in files] + ([("val", val_file)] if val_file else []):
        h.update(f"{label}:{path}:".encode())
        h.update(_file_digest(path).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    return cache_root() / "tokenized" / h.hexdigest()[:32]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything in a tokenizer that can change token ids or the rendered text."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())  # vocabulary, merges, normalizer, added tokens
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(getattr(tokenizer, "chat_template", None)).encode())
    h.update(json.dumps({k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}).encode())
    h.update(json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]).encode())
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_cache_payload(cache_dir: Path) -> dict | None:
    """The entry's JSON (format checked), or None: missing, of another format, or damaged (rebuilt, never
    trusted)."""
    try:
        data = json.loads((cache_dir / "bundle.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == CACHE_FORMAT else None


def write_cache_payload(cache_dir: Path, payload: dict) -> None:
    """Write atomically (temp file + rename) so a crash or a parallel run never leaves half a file."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic_open(cache_dir / "bundle.json") as f:
            json.dump({"format": CACHE_FORMAT, **payload}, f, separators=(",", ":"))
    except OSError as e:  # a read-only or full cache disk must not stop training
        warnings.warn(f"could not write the tokenized cache to {cache_dir}: {e}", stacklevel=2)


def _read_cache(cache_dir: Path) -> DataBundle | None:
    data = read_cache_payload(cache_dir)
    if data is None:
        return None
    try:
        def examples(items):
            return None if items is None else [Encoded(e["input_ids"], e["labels"], e["source"]) for e in items]

        return DataBundle(examples(data["train"]), examples(data["val"]), DataStats.from_dict(data["stats"]),
                          cache_hit=True)
    except (ValueError, KeyError, TypeError):
        return None  # a damaged entry is rebuilt, never trusted


def _write_cache(cache_dir: Path, bundle: DataBundle) -> None:
    def examples(items):
        return None if items is None else [{"input_ids": e.input_ids, "labels": e.labels, "source": e.source}
                                           for e in items]

    write_cache_payload(cache_dir, {"stats": bundle.stats.to_dict(), "train": examples(bundle.train),
                                    "val": examples(bundle.val)})
