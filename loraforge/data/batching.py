"""Micro-batches: which examples go into which row (a pure function of seed and epoch, so a resumed run sees the
same batches), and collation into tensors.

Modes (measured on SmolLM2 with rows of 20–256 tokens, FINDINGS / issue 6):
* ``padded``: shuffled examples, one per row, padded to the batch's longest row (~33% padding on mixed lengths).
* ``grouped``: like HF ``group_by_length``: shuffle, cut into mega-batches of 50 batches, sort each by length,
  then shuffle the batch order. Little padding, still random.
* ``packed``: several examples per row up to ``row_len`` tokens, each with its own ``position_ids`` starting at 0.
  transformers then builds a block-diagonal causal mask from the position ids — but only when no attention mask
  and no KV cache are passed (FINDINGS trap 2: with the cache on, the packed loss is silently wrong). So packed
  batches carry no ``attention_mask`` and the model must be called with ``use_cache=False``.
"""

from __future__ import annotations

import bisect
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

from loraforge.errors import ConfigError, Problem

if TYPE_CHECKING:
    import torch

    from loraforge.data.templates import Encoded

IGNORE_INDEX = -100
MEGABATCH_FACTOR = 50  # batches per length-sorted group, as HF's LengthGroupedSampler
Mode = Literal["padded", "grouped", "packed"]


def choose_batching(cfg: Any, model_dir: Path) -> str:
    """`auto` → packed for causal LMs whose attention honours packed position_ids (and a method without virtual
    tokens), else padded; an explicit `packed` that is not safe is refused.

    Raises:
        ConfigError: `batching: packed` for a model type or method where attention could cross examples.
    """
    from loraforge.config.methods import METHOD_OPTIONS
    from loraforge.models.discovery import load_hf_config
    from loraforge.models.registry import PACKABLE_MODEL_TYPES

    model_type = getattr(load_hf_config(model_dir, cfg.trust_remote_code), "model_type", "")
    options = METHOD_OPTIONS.get(cfg.method)
    packable = (getattr(cfg.task_type, "value", cfg.task_type) == "CAUSAL_LM" and model_type in PACKABLE_MODEL_TYPES
                and options is not None and options.packing_unsafe is None)
    if cfg.batching == "auto":
        return "packed" if packable else "padded"
    if cfg.batching == "packed" and not packable:
        raise ConfigError([Problem("batching", f"packing is not safe for model type `{model_type}` with method "
                                   f"`{cfg.method}`: attention could cross example boundaries", value="packed",
                                   allowed="padded, grouped", fix="use `batching: grouped`")])
    return cfg.batching


def make_batches(lengths: Sequence[int], batch_size: int, mode: Mode, *, seed: int, epoch: int, row_len: int,
                 shuffle: bool = True) -> list[list[list[int]]]:
    """Split example indices into micro-batches of `batch_size` rows.

    Args:
        lengths: token count of each example.
        batch_size: rows per micro-batch (the last one may be smaller).
        mode: padded | grouped | packed.
        seed, epoch: the order is a pure function of both: the same pair gives the same batches.
        row_len: packed only: most tokens in one row (every length must fit).
        shuffle: False keeps data order (padded/packed) or plain length order (grouped), for evaluation.

    Returns:
        ``batches[b][r]`` = example indices in row r of micro-batch b (one index per row unless packed).
        Every example appears exactly once.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rng = random.Random(f"loraforge-batches:{seed}:{epoch}")  # str seeds hash stably across processes
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if mode == "padded":
        rows = [[i] for i in order]
    elif mode == "grouped":
        return _grouped_batches(order, lengths, batch_size, rng, shuffle)
    elif mode == "packed":
        rows = pack_rows(order, lengths, row_len)
        if shuffle:
            rng.shuffle(rows)  # best-fit fills rows in order; shuffle so full and partial rows mix across batches
    else:
        raise ValueError(f"unknown batching mode {mode!r}")
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


def _grouped_batches(order: list[int], lengths: Sequence[int], batch_size: int, rng: random.Random,
                     shuffle: bool) -> list[list[list[int]]]:
    """Batches of similar lengths in random order. Each mega-batch is cut separately, so its last batch may be
    short (kept as is: re-flattening would misalign every later batch)."""
    if not shuffle:
        rows = [[i] for i in sorted(order, key=lambda i: (-lengths[i], i))]
        return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    mega = batch_size * MEGABATCH_FACTOR
    batches: list[list[list[int]]] = []
    for start in range(0, len(order), mega):
        group = sorted(order[start:start + mega], key=lambda i: -lengths[i])
        batches += [[[i] for i in group[j:j + batch_size]] for j in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


def pack_rows(order: Sequence[int], lengths: Sequence[int], row_len: int) -> list[list[int]]:
    """Best-fit packing in the given (shuffled) order: each example goes into the open row with the least room
    that still fits it, else starts a new row. Measured on the shuffled alpaca_zh demo at cutoff 512 it wastes a
    few percent of each row versus ~33% for padding (see tests), while keeping rows random from epoch to epoch
    (first-fit-decreasing packs slightly tighter but gives the same rows every epoch).

    Raises:
        ValueError: an example is longer than `row_len` (truncate or drop it first).
    """
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted: bisect finds the best fit in O(log n)
    for i in order:
        n = lengths[i]
        if n > row_len:
            raise ValueError(f"example {i} has {n} tokens, more than the packed row length {row_len}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
            rows[r].append(i)
            room -= n
        else:
            rows.append([i])
            r, room = len(rows) - 1, row_len - n
        if room > 0:
            bisect.insort(free, (room, r))
    return rows


def collate(examples: Sequence["Encoded"], batch: Sequence[Sequence[int]], pad_token_id: int, *,
            share_prefixes: bool = False, bucket: bool = False,
            pad_to_multiple_of: int | None = None) -> dict[str, "torch.Tensor"]:
    """Tensors for one micro-batch (right padding).

    Args:
        share_prefixes: in packed rows, lay out a sequence that begins like the row's latest full one as a
            branch reading that shared prefix (`data.row_layout`; same loss and gradients, fewer tokens).
        bucket: pad the width up to one of a few lengths per doubling (`row_layout.bucket_width`).
        pad_to_multiple_of: pad the width up to a multiple of this.

    Returns:
        ``input_ids`` and ``labels`` [rows, T] (pads and the first token of every example are -100, so no loss
        crosses an example boundary in a packed row and packed loss == padded loss); ``attention_mask`` for
        one-example rows; for packed batches (any row with several examples) ``position_ids`` restarting at 0
        per example (continuing at the branch point for a branch) and *no* ``attention_mask`` (transformers
        separates the examples from the position ids only when the mask is absent; the pads at the end of a row
        start their own "example" and are never attended by real tokens, which come before them). Call the
        model with ``use_cache=False``.
    """
    import torch

    from loraforge.data.row_layout import plan_rows

    packed = any(len(row) > 1 for row in batch)
    starts, width = plan_rows([[examples[i] for i in row] for row in batch], share_prefixes, bucket)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    positions = torch.zeros((len(batch), width), dtype=torch.long)
    for r, (row, bs) in enumerate(zip(batch, starts)):
        at = 0
        for i, b in zip(row, bs):
            ex = examples[i]
            n = len(ex.input_ids) - b
            input_ids[r, at:at + n] = torch.tensor(ex.input_ids[b:], dtype=torch.long)
            labels[r, at:at + n] = torch.tensor(ex.labels[b:], dtype=torch.long)
            labels[r, at] = IGNORE_INDEX  # predicted from the previous example's last token: never a target
            positions[r, at:at + n] = torch.arange(b, b + n)
            at += n
        attention[r, :at] = 1
        positions[r, at:] = torch.arange(width - at)  # pads: a separate run of positions, i.e. their own block
    if packed:
        return {"input_ids": input_ids, "labels": labels, "position_ids": positions}
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def count_trained_tokens(batch: dict[str, "torch.Tensor"]) -> int:
    """Tokens that contribute to the loss in a collated batch (labels are shifted by one inside the loss)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def padding_waste(batches: Sequence[Sequence[Sequence[int]]], lengths: Sequence[int]) -> float:
    """Fraction of token slots that are padding when each micro-batch is padded to its longest row."""
    real = total = 0
    for b in batches:
        row_lens = [sum(lengths[i] for i in row) for row in b]
        real += sum(row_lens)
        total += max(row_lens) * len(row_lens)
    return 1 - real / total if total else 0.0
