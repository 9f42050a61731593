"""Datasets for the task types other than CAUSAL_LM: rows → token ids and targets, and their collation.

Row shapes (in .jsonl / .json / .csv, read by `formats.read_rows`, every bad line reported as ``file:line``):

- SEQ_2_SEQ_LM: ``{"input", "output"}`` or ``{"instruction", "input"?, "output"}`` (instruction and input are
  joined by a newline). Target = the output's tokens + EOS; loss averaged over target tokens.
- SEQ_CLS: ``{cfg.text_column, cfg.label_column}``; the label list is `cfg.label_names` or the sorted distinct
  labels of the training data (numerically when all are integers). Loss averaged over examples.
- TOKEN_CLS: ``{"tokens": [words], "tags": [one tag per word]}``; the first sub-token of each word carries its tag,
  later sub-tokens and special tokens are -100. Loss averaged over words.
- QUESTION_ANSWERING (extractive): ``{"context", "question", "answer"}``; the answer text's first occurrence in
  the context gives the start/end token positions. Loss (start CE + end CE) / 2 averaged over examples.
- FEATURE_EXTRACTION: contrastive sentence embeddings — ``{"anchor" (or cfg.text_column), "positive"}`` pairs;
  each anchor must pick its own positive among all positives of the micro-batch (the loss is
  `loraforge/objectives/contrastive.py`).

Every example has `input_ids` (used for length-based batching) and `num_targets` (what the loss averages over);
`collate_task` returns the model's keyword arguments plus `num_targets` (a 0-dim tensor), so a loss module can
turn the model's mean loss back into a sum and the loop can normalize over a whole optimizer step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from loraforge.data.checks import DataStats, length_percentiles
from loraforge.data.dataset import check_val_options, split_rows
from loraforge.errors import DataError, Problem

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100
MAX_SHOWN = 20


@dataclass
class TaskExample:
    """One encoded example of a non-causal task.

    Attributes:
        input_ids: the (encoder) input tokens.
        num_targets: target tokens / words / examples the loss averages over for this example.
        labels: SEQ_2_SEQ_LM target ids; TOKEN_CLS per-token label ids (-100 where no loss).
        label: SEQ_CLS class id.
        start_position, end_position: QUESTION_ANSWERING answer span (token indices, inclusive).
        pair_ids: FEATURE_EXTRACTION positive text tokens.
        source: ``file:line`` of the row.
    """

    input_ids: list[int]
    num_targets: int
    labels: list[int] | None = None
    label: int | None = None
    start_position: int | None = None
    end_position: int | None = None
    pair_ids: list[int] | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TaskDataBundle:
    """Same fields as `dataset.DataBundle`, plus the label list of classification tasks (for the model head)."""

    train: list[TaskExample]
    val: list[TaskExample] | None
    stats: DataStats
    cache_hit: bool = False
    label_names: list[str] | None = None

    @property
    def id2label(self) -> dict[int, str] | None:
        return dict(enumerate(self.label_names)) if self.label_names else None


# ---------------------------------------------------------------------------------------------- rows


def _rows(paths: Sequence[Path]):
    from loraforge.data.formats import read_rows

    problems: list[Problem] = []
    rows = []
    for path in paths:
        try:
            rows += read_rows(path)
        except DataError as err:
            problems += err.problems
    if problems:
        raise DataError(problems[:MAX_SHOWN])
    return rows


def _text(row, key: str, problems: list[Problem], *, optional: bool = False) -> str | None:
    value = row.data.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        what = "missing" if value is None else "must be a non-empty string"
        problems.append(Problem(row.source, f"`{key}` {what}", value=None if value is None else _clip(value),
                                allowed=f"keys: {', '.join(row.data)}" if value is None else None))
        return None
    return value


def _clip(value: Any, n: int = 60) -> str:
    s = value if isinstance(value, str) else repr(value)
    return s if len(s) <= n else s[:n] + "…"


def _label_key(value: Any) -> str:
    return str(value).strip()


def _sorted_labels(values: set[str]) -> list[str]:
    if values and all(re.fullmatch(r"-?\d+", v) for v in values):
        return sorted(values, key=int)
    return sorted(values)


def infer_label_names(cfg: Any) -> list[str] | None:
    """The label list of a SEQ_CLS / TOKEN_CLS run: `cfg.label_names`, or inferred from the training files.

    Needed before the model is loaded (its head has one output per label). None for other task types.

    Raises:
        DataError: unreadable data files.
    """
    from loraforge.data.formats import resolve_train_files

    task = _task(cfg)
    if task not in ("SEQ_CLS", "TOKEN_CLS"):
        return None
    if cfg.label_names:
        return list(cfg.label_names)
    seen: set[str] = set()
    for row in _rows(resolve_train_files(cfg)):
        if task == "SEQ_CLS" and cfg.label_column in row.data and row.data[cfg.label_column] is not None:
            seen.add(_label_key(row.data[cfg.label_column]))
        elif task == "TOKEN_CLS" and isinstance(row.data.get("tags"), list):
            seen.update(_label_key(t) for t in row.data["tags"])
    return _sorted_labels(seen)


def _task(cfg: Any) -> str:
    return getattr(cfg.task_type, "value", cfg.task_type)


# ---------------------------------------------------------------------------------------------- encoders
# Each returns (example or None, problems, was_truncated).


def _encode_seq2seq(row, cfg, tok, ctx) -> tuple[TaskExample | None, list[Problem], bool]:
    problems: list[Problem] = []
    data = row.data
    if "instruction" in data:
        instruction = _text(row, "instruction", problems)
        extra = _text(row, "input", problems, optional=True)
        source = instruction if not extra else f"{instruction}\n{extra}"
    else:
        source = _text(row, "input", problems)
    target = _text(row, "output", problems)
    if problems:
        return None, problems, False
    ids = tok(source)["input_ids"]
    labels = tok(text_target=target)["input_ids"]
    if tok.eos_token_id is not None and (not labels or labels[-1] != tok.eos_token_id):
        labels = labels + [tok.eos_token_id]  # the model must learn where the output ends
    cut = len(ids) > cfg.cutoff_len or len(labels) > cfg.cutoff_len
    ids, labels = ids[:cfg.cutoff_len], labels[:cfg.cutoff_len]
    return TaskExample(ids, len(labels), labels=labels, source=row.source), [], cut


def _encode_seq_cls(row, cfg, tok, ctx) -> tuple[TaskExample | None, list[Problem], bool]:
    problems: list[Problem] = []
    text = _text(row, cfg.text_column, problems)
    raw = row.data.get(cfg.label_column)
    if raw is None:
        problems.append(Problem(row.source, f"`{cfg.label_column}` missing", allowed=f"keys: {', '.join(row.data)}",
                                fix="set `label_column` to the field holding the label"))
    elif _label_key(raw) not in ctx["label_ids"]:
        problems.append(Problem(row.source, "label not in the label list", value=raw,
                                allowed=", ".join(ctx["label_ids"]), fix="add it to `label_names` or fix the row"))
    if problems:
        return None, problems, False
    ids = tok(text)["input_ids"]
    cut = len(ids) > cfg.cutoff_len
    return TaskExample(ids[:cfg.cutoff_len], 1, label=ctx["label_ids"][_label_key(raw)], source=row.source), [], cut


def _word_of_tokens(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int | None]:
    """For each token (char offsets), the index of the word it overlaps, or None (special tokens, spaces)."""
    out: list[int | None] = []
    w = 0
    for s, e in offsets:
        if e <= s:
            out.append(None)
            continue
        while w < len(spans) and spans[w][1] <= s:
            w += 1
        # overlap test: a byte-level BPE token may include the space before the word
        out.append(w if w < len(spans) and spans[w][0] < e else None)
    return out


def _encode_token_cls(row, cfg, tok, ctx) -> tuple[TaskExample | None, list[Problem], bool]:
    words, tags = row.data.get("tokens"), row.data.get("tags")
    problems: list[Problem] = []
    if not isinstance(words, list) or not words or not all(isinstance(w, str) and w for w in words):
        problems.append(Problem(row.source, "`tokens` must be a non-empty list of non-empty strings",
                                value=None if words is None else _clip(words), allowed='{"tokens": [...], "tags": [...]}'))
    if not isinstance(tags, list):
        problems.append(Problem(row.source, "`tags` must be a list (one tag per token)",
                                value=None if tags is None else _clip(tags)))
    elif isinstance(words, list) and len(tags) != len(words):
        problems.append(Problem(row.source, f"{len(words)} tokens but {len(tags)} tags", value=len(tags),
                                allowed=str(len(words)), fix="give exactly one tag per token"))
    else:
        bad = sorted({_label_key(t) for t in tags} - set(ctx["label_ids"]))
        if bad:
            problems.append(Problem(row.source, "tags not in the label list", value=bad,
                                    allowed=", ".join(ctx["label_ids"]), fix="add them to `label_names`"))
    if problems:
        return None, problems, False
    text, spans, at = "", [], 0
    for i, word in enumerate(words):
        if i:
            text += " "
            at += 1
        spans.append((at, at + len(word)))
        text += word
        at += len(word)
    enc = tok(text, return_offsets_mapping=True)
    owner = _word_of_tokens(enc["offset_mapping"], spans)
    labels, last = [], None
    for w in owner:
        labels.append(ctx["label_ids"][_label_key(tags[w])] if w is not None and w != last else IGNORE_INDEX)
        last = w if w is not None else last
    ids = enc["input_ids"]
    cut = len(ids) > cfg.cutoff_len
    ids, labels = ids[:cfg.cutoff_len], labels[:cfg.cutoff_len]
    n = sum(1 for t in labels if t != IGNORE_INDEX)
    if n == 0:
        return None, [], cut
    return TaskExample(ids, n, labels=labels, source=row.source), [], cut


def _encode_qa(row, cfg, tok, ctx) -> tuple[TaskExample | None, list[Problem], bool]:
    problems: list[Problem] = []
    context = _text(row, "context", problems)
    question = _text(row, "question", problems)
    answer = _text(row, "answer", problems)
    if problems:
        return None, problems, False
    start_char = context.find(answer)
    if start_char < 0:
        return None, [Problem(row.source, "the answer text does not occur in the context", value=_clip(answer),
                              fix="extractive QA needs the answer copied exactly (same case and spacing) "
                                  "from the context")], False
    end_char = start_char + len(answer)
    enc = tok(question, context, return_offsets_mapping=True)
    seq = enc.sequence_ids()
    offsets = enc["offset_mapping"]
    ctx_tokens = [i for i, s in enumerate(seq) if s == 1 and offsets[i][1] > offsets[i][0]]
    start = next((i for i in ctx_tokens if offsets[i][1] > start_char), None)
    end = next((i for i in reversed(ctx_tokens) if offsets[i][0] < end_char), None)
    ids = enc["input_ids"]
    if start is None or end is None or end < start:
        return None, [Problem(row.source, "the tokenizer's offsets do not cover the answer", value=_clip(answer))], False
    if end >= cfg.cutoff_len:
        if cfg.overlong == "drop":
            return None, [], True
        return None, [Problem(row.source, f"the answer ends at token {end}, beyond cutoff_len", value=cfg.cutoff_len,
                              fix=f"raise cutoff_len above {end}, shorten the context, or use `overlong: drop`")], True
    cut = len(ids) > cfg.cutoff_len
    return TaskExample(ids[:cfg.cutoff_len], 1, start_position=start, end_position=end, source=row.source), [], cut


def _encode_pair(row, cfg, tok, ctx) -> tuple[TaskExample | None, list[Problem], bool]:
    problems: list[Problem] = []
    anchor = _text(row, "anchor" if "anchor" in row.data else cfg.text_column, problems)
    positive = _text(row, "positive", problems)
    if problems:
        return None, problems, False
    a, p = tok(anchor)["input_ids"], tok(positive)["input_ids"]
    cut = len(a) > cfg.cutoff_len or len(p) > cfg.cutoff_len
    return TaskExample(a[:cfg.cutoff_len], 1, pair_ids=p[:cfg.cutoff_len], source=row.source), [], cut


ENCODERS: dict[str, Callable[..., tuple[TaskExample | None, list[Problem], bool]]] = {
    "SEQ_2_SEQ_LM": _encode_seq2seq,
    "SEQ_CLS": _encode_seq_cls,
    "TOKEN_CLS": _encode_token_cls,
    "QUESTION_ANSWERING": _encode_qa,
    "FEATURE_EXTRACTION": _encode_pair,
}


def encode_rows(rows, cfg: Any, tokenizer: Any, label_names: list[str] | None,
                stats: DataStats | None = None) -> list[TaskExample]:
    """Encode rows for `cfg.task_type`; every bad row is reported at once (first 20 shown).

    Raises:
        DataError: bad rows (``file:line`` each), or a slow tokenizer where offsets are needed.
    """
    task = _task(cfg)
    if task in ("TOKEN_CLS", "QUESTION_ANSWERING") and not getattr(tokenizer, "is_fast", False):
        raise DataError([Problem("task_type", f"{task} needs a fast tokenizer (character offsets of tokens)",
                                 value=task, fix="use a model whose tokenizer.json is present")])
    ctx = {"label_ids": {name: i for i, name in enumerate(label_names or [])}}
    encode = ENCODERS[task]
    out: list[TaskExample] = []
    problems: list[Problem] = []
    lengths: list[int] = []
    for row in rows:
        ex, row_problems, cut = encode(row, cfg, tokenizer, ctx)
        problems += row_problems
        if row_problems:
            continue
        if stats is not None and cut:
            stats.over_cutoff += 1
        if ex is None or (cut and cfg.overlong == "drop"):
            if stats is not None and cut:
                stats.dropped += 1
            continue
        if stats is not None and cut:
            stats.truncated += 1
        out.append(ex)
        lengths.append(len(ex))
    if problems:
        more = f" (and {len(problems) - MAX_SHOWN} more)" if len(problems) > MAX_SHOWN else ""
        raise DataError(problems[:MAX_SHOWN], title=f"invalid {task} data{more}")
    if stats is not None:
        stats.examples = len(out)
        stats.trained_tokens = sum(e.num_targets for e in out)
        stats.total_tokens = sum(lengths)
        for key, value in length_percentiles(lengths).items():
            setattr(stats, key, value)
    return out


def build_task_datasets(cfg: Any, tokenizer: Any) -> TaskDataBundle:
    """Train (and validation) examples for a non-CAUSAL_LM `cfg.task_type`.

    Raises:
        DataError: missing files, bad rows (all listed), a bad split, or no usable example.
    """
    from loraforge.data.formats import resolve_train_files

    task = _task(cfg)
    if task not in ENCODERS:
        raise DataError([Problem("task_type", "not a task type with a task dataset", value=task,
                                 allowed=", ".join(ENCODERS))])
    files = resolve_train_files(cfg)
    val_file = check_val_options(cfg)
    rows = _rows(files)
    val_rows = _rows([val_file]) if val_file is not None else None
    if cfg.val_size > 0:
        rows, val_rows = split_rows(rows, cfg.val_size, cfg.seed)
    label_names = infer_label_names(cfg)
    if label_names is not None and len(label_names) < 2 and task == "SEQ_CLS":
        raise DataError([Problem(cfg.label_column, "a classifier needs at least 2 labels", value=label_names,
                                 fix="check `label_column`, or list the classes in `label_names`")])
    stats = DataStats(files=[str(f) for f in files], cutoff_len=cfg.cutoff_len, overlong=cfg.overlong)
    train = encode_rows(rows, cfg, tokenizer, label_names, stats)
    if not train:
        raise DataError([Problem("cutoff_len", f"no usable training example among {len(rows)} rows",
                                 value=cfg.cutoff_len, fix="raise cutoff_len or use `overlong: truncate`")])
    val = None
    if val_rows is not None:
        val = encode_rows(val_rows, cfg, tokenizer, label_names)
        stats.val_examples = len(val)
    return TaskDataBundle(train, val, stats, label_names=label_names)


# ---------------------------------------------------------------------------------------------- batches


def _pad(seqs: Sequence[Sequence[int]], value: int):
    import torch

    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        out[r, :len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[r, :len(s)] = 1
    return out, mask


def collate_task(examples: Sequence[TaskExample], micro_batch: Sequence[Sequence[int]], pad_token_id: int,
                 task_type: Any) -> dict[str, torch.Tensor]:
    """Tensors for one micro-batch (right padding; one example per row — task examples are never packed).

    Returns the model's keyword arguments (`input_ids`, `attention_mask` and `labels` / `start_positions` +
    `end_positions`; FEATURE_EXTRACTION: anchors then positives stacked as 2·B rows) plus `num_targets`, a 0-dim
    tensor: the targets the model's mean loss is taken over. SEQ_2_SEQ_LM needs no `decoder_input_ids`: the
    model builds them by shifting `labels`.
    """
    import torch

    task = getattr(task_type, "value", task_type)
    batch = [examples[i] for row in micro_batch for i in row]
    n = torch.tensor(sum(e.num_targets for e in batch), dtype=torch.long)
    if task == "FEATURE_EXTRACTION":
        ids, mask = _pad([e.input_ids for e in batch] + [e.pair_ids for e in batch], pad_token_id)
        return {"input_ids": ids, "attention_mask": mask, "num_targets": n}
    ids, mask = _pad([e.input_ids for e in batch], pad_token_id)
    out = {"input_ids": ids, "attention_mask": mask, "num_targets": n}
    if task == "SEQ_2_SEQ_LM":
        out["labels"], _ = _pad([e.labels for e in batch], IGNORE_INDEX)
    elif task == "TOKEN_CLS":
        labels, _ = _pad([e.labels for e in batch], IGNORE_INDEX)
        out["labels"] = labels[:, :ids.shape[1]]
    elif task == "SEQ_CLS":
        out["labels"] = torch.tensor([e.label for e in batch], dtype=torch.long)
    elif task == "QUESTION_ANSWERING":
        out["start_positions"] = torch.tensor([e.start_position for e in batch], dtype=torch.long)
        out["end_positions"] = torch.tensor([e.end_position for e in batch], dtype=torch.long)
    return out


TASK_TYPES = tuple(ENCODERS)
__all__ = ["TaskExample", "TaskDataBundle", "build_task_datasets", "collate_task", "infer_label_names", "TASK_TYPES",
           "IGNORE_INDEX"]
