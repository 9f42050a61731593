"""Preference data: rows → (prompt messages, chosen / rejected replies) or KTO's (prompt, reply, label) → encoded.

Row shapes (one JSON object per line, .json arrays and .csv as for SFT):

* pairwise, alpaca style: ``{"instruction" | "prompt", "input"?, "system"?, "chosen", "rejected"}``;
* chat: ``{"messages": [... ending with a user turn], "chosen": {"role": "assistant", "content"} | str,
  "rejected": ...}``;
* ranking conversations (LLaMA-Factory's sharegpt ranking data): ``{"conversations": [{"from", "value"}, ...],
  "chosen": {"from": "gpt", "value"}, "rejected": {...}}``;
* KTO, unpaired: ``{"instruction" | "prompt" | "messages" | "conversations", "output" | "completion",
  "label" | "kto_tag": true | false}``.

Every side is encoded by the SFT template's one masking function (`templates.encode_conversation`): the prompt
messages plus that side as the final assistant reply, so prompt tokens carry no label and only the reply (with
its end-of-turn token) is scored. A pair's two sides become one example: both are packed into one row.

Encoded examples go to SFT's tokenized cache (`data/dataset.py`), keyed the same way plus the kind of rows
(pairs or KTO rows), so a second run with unchanged data, tokenizer and options does not tokenize again.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraforge.data.checks import DataStats, length_percentiles
from loraforge.data.dataset import (check_val_options, read_cache_payload, split_rows, tokenized_cache_dir,
                                    write_cache_payload)
from loraforge.data.formats import (SHAREGPT_ROLES, Row, _chat_messages, _raise_if, check_messages,
                                    resolve_train_files, _read_rows)
from loraforge.data.templates import IGNORE_INDEX, Encoded, Message, encode_conversation
from loraforge.errors import DataError, Problem

PAIR_SHAPES = ('{"instruction"|"prompt", "input"?, "chosen", "rejected"} or {"messages": [...], "chosen": {...}, '
               '"rejected": {...}} or {"conversations": [...], "chosen": {...}, "rejected": {...}}')
KTO_SHAPES = '{"instruction"|"prompt"|"messages", "output"|"completion", "label"|"kto_tag": true|false}'


@dataclass
class PrefRow:
    """A checked preference row: the prompt (ending with a user turn) and its replies."""

    source: str
    prompt: list[Message]
    chosen: str = ""
    rejected: str = ""
    desirable: bool | None = None  # KTO rows: the label; pairs: None


@dataclass
class PairExample:
    """Both sides of one pair, encoded; `input_ids` (their concatenation) is what batching measures and packs."""

    chosen: Encoded
    rejected: Encoded
    source: str = ""
    ref_logps: tuple[float, float] | None = None  # `pref_reference: precomputed`: the reference's (chosen, rejected)

    @property
    def input_ids(self) -> list[int]:
        return self.chosen.input_ids + self.rejected.input_ids

    @property
    def sides(self) -> tuple[Encoded, ...]:
        return (self.chosen, self.rejected)


@dataclass
class KtoExample:
    """One unpaired example: prompt + reply encoded, how many leading tokens are the prompt, and its label."""

    encoded: Encoded
    prompt_len: int
    desirable: bool
    source: str = ""

    @property
    def input_ids(self) -> list[int]:
        return self.encoded.input_ids

    @property
    def sides(self) -> tuple[Encoded, ...]:
        return (self.encoded,)


@dataclass
class PreferenceBundle:
    train: list
    val: list | None
    stats: DataStats
    cache_hit: bool = False


# ---------------------------------------------------------------------------------------------- rows


def load_preference_rows(paths: list[Path], cfg: Any) -> list[PrefRow]:
    """Read and check every row of every file (pairs, or KTO rows when `cfg.stage == "kto"`).

    Raises:
        DataError: every bad line (`file:line`): a missing or empty side, chosen == rejected, a missing label, …
    """
    kto = cfg.stage == "kto"
    problems: list[Problem] = []
    out: list[PrefRow] = []
    for path in paths:
        for row in _read_rows(Path(path), problems):
            parsed, row_problems = (_kto_row if kto else _pair_row)(row, cfg.system_prompt)
            problems += row_problems
            if parsed is not None and not row_problems:
                out.append(parsed)
    if not problems and not out:
        problems.append(Problem(", ".join(map(str, paths)) or "data", "no examples found",
                                allowed=KTO_SHAPES if kto else PAIR_SHAPES))
    _raise_if(problems)
    return out


def _prompt_messages(data: dict, where: str, system_prompt: str | None) -> tuple[list[Message], list[Problem]]:
    """The prompt turns of a row (ending with a user turn), from alpaca, `messages` or `conversations` fields."""
    if "messages" in data:
        messages, problems = _chat_messages(data["messages"], where, "messages", "role", "content", None)
    elif "conversations" in data:
        messages, problems = _chat_messages(data["conversations"], where, "conversations", "from", "value",
                                            SHAREGPT_ROLES)
    else:
        key = "instruction" if "instruction" in data else "prompt"
        text = data.get(key)
        if not isinstance(text, str) or not text.strip():
            what = "is missing" if key not in data else "must be a non-empty string"
            return [], [Problem(where, f"`instruction` (or `prompt`) {what}", value=None if text is None else
                                _clip(text), allowed=PAIR_SHAPES,
                                fix="write the question as `prompt` (or `instruction`), one string")]
        extra = data.get("input")
        if extra is not None and not isinstance(extra, str):
            return [], [Problem(where, "`input` must be a string", value=_clip(extra), fix="write `input` as one string")]
        messages = [{"role": "user", "content": f"{text}\n{extra}" if extra else text}]
        problems = []
        system = data.get("system")
        if isinstance(system, str) and system.strip():
            messages.insert(0, {"role": "system", "content": system})
    if problems:
        return [], problems
    if isinstance(data.get("system"), str) and data["system"].strip() and messages and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": data["system"]})
    # the prompt must read as a conversation waiting for the assistant: check it with a placeholder reply
    problems = check_messages(messages + [{"role": "assistant", "content": "x"}], where)
    if problems:
        return [], [Problem(where, "the prompt turns must end with a user turn (the replies are `chosen` / "
                            "`rejected`)", value=[m["role"] for m in messages],
                            fix="end the prompt turns with the user's question; the assistant replies go in chosen/rejected")]
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages, []


def _reply_text(value: Any, where: str, field: str) -> tuple[str | None, list[Problem]]:
    """A reply given as a string, a message object ({role|from, content|value}) or a one-message list."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        role = value.get("role", value.get("from", "assistant"))
        if SHAREGPT_ROLES.get(role) != "assistant":
            return None, [Problem(where, f"`{field}` must be an assistant reply", value=role, allowed="assistant, gpt",
                                  fix=f'write `{field}` as {{"role": "assistant", "content": "..."}} or as a string')]
        value = value.get("content", value.get("value"))
    if value is None:
        return None, [Problem(where, f"missing `{field}`", allowed=PAIR_SHAPES,
                                      fix=f"add the {field} reply, or remove the row")]
    if not isinstance(value, str):
        return None, [Problem(where, f"`{field}` must be a string or an assistant message", value=_clip(value),
                                      fix=f'write `{field}` as one string or {{"role": "assistant", "content": "..."}}')]
    if not value.strip():
        return None, [Problem(where, f"empty `{field}`", fix=f"write the {field} reply, or remove the row")]
    return value, []


def _pair_row(row: Row, system_prompt: str | None) -> tuple[PrefRow | None, list[Problem]]:
    data, where = row.data, row.source
    prompt, problems = _prompt_messages(data, where, system_prompt)
    chosen, p1 = _reply_text(data.get("chosen"), where, "chosen")
    rejected, p2 = _reply_text(data.get("rejected"), where, "rejected")
    problems += p1 + p2
    if not problems and chosen.strip() == rejected.strip():
        problems.append(Problem(where, "`chosen` and `rejected` are the same reply", value=_clip(chosen),
                                fix="a pair must prefer one reply over a different one; fix or remove the row"))
    if problems:
        return None, problems
    return PrefRow(where, prompt, chosen, rejected), []


def _kto_row(row: Row, system_prompt: str | None) -> tuple[PrefRow | None, list[Problem]]:
    data, where = row.data, row.source
    prompt, problems = _prompt_messages(data, where, system_prompt)
    field = "output" if "output" in data else "completion"
    reply, p = _reply_text(data.get(field), where, field)
    problems += p
    label_key = "label" if "label" in data else "kto_tag"
    label = data.get(label_key)
    if not isinstance(label, bool):
        what = "missing `label` (or `kto_tag`)" if label is None else f"`{label_key}` must be true or false"
        problems.append(Problem(where, what, value=label, allowed="true (desirable) or false (undesirable)",
                                fix="add `\"label\": true` or `false`" if label is None else "write it as a JSON boolean, without quotes"))
    if problems:
        return None, problems
    return PrefRow(where, prompt, chosen=reply, desirable=label), []


def _clip(value: Any, n: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = text.strip()
    return text if len(text) <= n else text[:n] + "…"


# ---------------------------------------------------------------------------------------------- encoding


def encode_side(tokenizer: Any, prompt: list[Message], reply: str, cfg: Any, source: str) -> Encoded:
    """The prompt plus one reply, through the SFT template's masking (only the reply is labelled), untruncated."""
    messages = prompt + [{"role": "assistant", "content": reply}]
    encoded, _ = encode_conversation(tokenizer, messages, template=cfg.template, cutoff_len=sys.maxsize,
                                     train_on_prompt=False, source=source)
    return encoded


def _truncate(enc: Encoded, limit: int) -> Encoded:
    return Encoded(enc.input_ids[:limit], enc.labels[:limit], enc.source) if len(enc.input_ids) > limit else enc


def encode_rows(tokenizer: Any, rows: list[PrefRow], cfg: Any, stats: DataStats) -> tuple[list, list[int]]:
    """Encoded examples and the full (untruncated) length of every row.

    `cutoff_len` bounds one example: a pair's two sides together (they share one row), so each side keeps at
    most `cutoff_len // 2` tokens; a KTO example keeps `cutoff_len`. A side left with no labelled token drops
    its example; `overlong: drop` drops every example over the limit.
    """
    kto = cfg.stage == "kto"
    limit = cfg.cutoff_len if kto else cfg.cutoff_len // 2
    kept: list = []
    lengths: list[int] = []
    for row in rows:
        if kto:
            full = encode_side(tokenizer, row.prompt, row.chosen, cfg, row.source)
            sides = [full]
        else:
            sides = [encode_side(tokenizer, row.prompt, r, cfg, row.source) for r in (row.chosen, row.rejected)]
        lengths.append(sum(len(s.input_ids) for s in sides))
        if any(len(s.input_ids) > limit for s in sides):
            stats.over_cutoff += 1
            if cfg.overlong == "drop":
                stats.dropped += 1
                continue
            stats.truncated += 1
        sides = [_truncate(s, limit) for s in sides]
        if any(s.trained_tokens == 0 for s in sides):
            stats.dropped += 1
            continue
        if kto:
            prompt_len = next(i for i, t in enumerate(sides[0].labels) if t != IGNORE_INDEX)
            kept.append(KtoExample(sides[0], prompt_len, bool(row.desirable), row.source))
        else:
            kept.append(PairExample(sides[0], sides[1], row.source))
    return kept, lengths


def build_preference_data(cfg: Any, tokenizer: Any) -> PreferenceBundle:
    """Encoded train (and validation) preference examples of `cfg` with their stats.

    Raises:
        DataError: bad rows (all listed with file:line), a bad split, or no usable example.
    """
    files = resolve_train_files(cfg)
    val_file = check_val_options(cfg)
    cache_dir = None
    if cfg.tokenized_cache:  # SFT's cache, keyed the same way, plus the kind of rows
        cache_dir = tokenized_cache_dir(cfg, tokenizer, files, val_file, rows="kto" if cfg.stage == "kto" else "pairs")
        cached = _from_payload(read_cache_payload(cache_dir))
        if cached is not None:
            return cached
    problems: list[Problem] = []
    train_rows: list[PrefRow] = []
    val_rows = None
    for target, paths in (("train", files), ("val", [val_file] if val_file else [])):
        if not paths:
            continue
        try:
            rows = load_preference_rows(paths, cfg)
        except DataError as e:
            problems += e.problems
            continue
        if target == "train":
            train_rows = rows
        else:
            val_rows = rows
    if problems:
        raise DataError(problems)
    if cfg.val_size > 0:
        train_rows, val_rows = split_rows(train_rows, cfg.val_size, cfg.seed)
    stats = DataStats(files=[str(f) for f in files], cutoff_len=cfg.cutoff_len, overlong=cfg.overlong)
    train, lengths = encode_rows(tokenizer, train_rows, cfg, stats)
    stats.examples = len(train)
    stats.trained_tokens = sum(s.trained_tokens for e in train for s in e.sides)
    stats.total_tokens = sum(len(e.input_ids) for e in train)
    for key, value in length_percentiles(lengths).items():
        setattr(stats, key, value)
    if not train:
        raise DataError([Problem("cutoff_len", f"no usable training example: all {len(train_rows)} were dropped",
                                 value=cfg.cutoff_len, fix=f"raise cutoff_len (longest example: {stats.max} tokens; "
                                 "a pair's two sides count together) or use `overlong: truncate`")])
    val = None
    if val_rows is not None:
        val, _ = encode_rows(tokenizer, val_rows, cfg, DataStats())
        stats.val_examples = len(val)
        if not val:
            raise DataError([Problem("val_file" if val_file else "val_size", "no usable validation example",
                                     fix="raise cutoff_len")])
    bundle = PreferenceBundle(train, val, stats)
    if cache_dir is not None:
        write_cache_payload(cache_dir, _to_payload(bundle))
    return bundle


# ---------------------------------------------------------------------------------------------- cache entries


def _encoded(e: Encoded) -> dict:
    return {"input_ids": e.input_ids, "labels": e.labels, "source": e.source}


def _example_dict(ex: PairExample | KtoExample) -> dict:
    if isinstance(ex, KtoExample):
        return {"encoded": _encoded(ex.encoded), "prompt_len": ex.prompt_len, "desirable": ex.desirable,
                "source": ex.source}
    return {"chosen": _encoded(ex.chosen), "rejected": _encoded(ex.rejected), "source": ex.source}


def _example(d: dict) -> PairExample | KtoExample:
    enc = lambda e: Encoded(e["input_ids"], e["labels"], e["source"])  # noqa: E731
    if "encoded" in d:
        return KtoExample(enc(d["encoded"]), int(d["prompt_len"]), bool(d["desirable"]), d["source"])
    return PairExample(enc(d["chosen"]), enc(d["rejected"]), d["source"])


def _to_payload(bundle: PreferenceBundle) -> dict:
    return {"stats": bundle.stats.to_dict(), "train": [_example_dict(e) for e in bundle.train],
            "val": None if bundle.val is None else [_example_dict(e) for e in bundle.val]}


def _from_payload(data: dict | None) -> PreferenceBundle | None:
    """The cached bundle, or None (no entry, or a damaged one: rebuilt, never trusted)."""
    if data is None:
        return None
    try:
        return PreferenceBundle([_example(d) for d in data["train"]],
                                None if data["val"] is None else [_example(d) for d in data["val"]],
                                DataStats.from_dict(data["stats"]), cache_hit=True)
    except (ValueError, KeyError, TypeError):
        return None


__all__ = ["KtoExample", "PairExample", "PrefRow", "PreferenceBundle", "build_preference_data", "encode_rows",
           "encode_side", "load_preference_rows"]
