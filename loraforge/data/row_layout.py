"""How the sequences of a packed row are laid out: shared prompt prefixes, and row widths in a few buckets.

**Shared prefixes.** Sequences packed into one row often begin with the same tokens: the chosen and rejected
replies of a preference pair share their whole prompt, a KTO example and its KL sequence share theirs, and
chat-template SFT rows share the system prompt. Under causal attention a token's hidden states depend only on the
tokens before it, so a shared prefix gives the same hidden states in every sequence; only the first copy is
needed. A later sequence is laid out as a *branch*: only its tokens from `start` on, with `position_ids`
continuing at `start` (not restarting at 0), and the varlen attention (`train.attention`) lets the branch attend
to the first `start` tokens of the row's latest full sequence (its *root*) and then causally to itself. The
gradient through the shared prefix is the sum of the sequences' gradients, as autograd computes it from the one
copy, so loss and gradients are those of the unshared row (`tests/test_row_layout.py`).

A branch may start only where nothing of it before `start` is trained: a target at position i is predicted from
position i-1, so `labels[1..start]` must all be ignored (prompt tokens are), and `input_ids[:start]` must equal
the root's. `start` is the largest such length, or 0 (the sequence is laid out whole and becomes the new root)
when fewer than `MIN_SHARED` tokens would be saved. The attention finds sequences where the position ids do not
count on by one, so a branch never starts at the position right after the previous sequence's last one.

**Row-width buckets.** On a CPU each new matrix shape makes oneDNN build (and cache, ~0.25 MB each) new matmul
kernels; packed rows have a new width nearly every step, so every step pays the builds and the kernel cache
grows until it is full (measured on the persona case: peak RSS 1,740 → 1,460 MB with widths in buckets, steps no
slower). `bucket_width` rounds a width up to one of eight values per doubling (at most 12.5% padding).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from loraforge.data.templates import Encoded

IGNORE_INDEX = -100
MIN_SHARED = 4  # a shorter common prefix is not worth a branch


def bucket_width(width: int) -> int:
    """`width` rounded up to a multiple of 1/8 of the power of two below it (e.g. 211 → 224, 1,270 → 1,280)."""
    step = 1 << max(0, width.bit_length() - 4)
    return -(-width // step) * step


def shared_start(root: Encoded, seq: Encoded) -> int:
    """How many leading tokens of `seq` can be read from `root` (0: none, lay it out whole)."""
    limit = min(len(root.input_ids), len(seq.input_ids) - 1)
    common = 0
    while common < limit and root.input_ids[common] == seq.input_ids[common]:
        common += 1
    untrained = 0  # leading positions of seq whose label is ignored
    while untrained < len(seq.labels) and seq.labels[untrained] == IGNORE_INDEX:
        untrained += 1
    start = min(common, untrained - 1)
    return start if start >= MIN_SHARED else 0


def branch_starts(row: Sequence[Encoded], share: bool) -> list[int]:
    """For each sequence of a packed row, the first of its tokens that is laid out (0 for a root)."""
    starts: list[int] = []
    root, last_position = None, -1
    for seq in row:
        start = shared_start(root, seq) if share and root is not None else 0
        if start and start == last_position + 1:
            # positions continuing the previous sequence would read as one sequence: start one token earlier
            start = start - 1 if start - 1 >= MIN_SHARED else 0
        if start == 0:
            root = seq
        starts.append(start)
        last_position = len(seq.input_ids) - 1
    return starts


def plan_rows(rows: Sequence[Sequence[Encoded]], share_prefixes: bool, bucket: bool) -> tuple[list[list[int]], int]:
    """(`branch_starts` of each row — sharing only in rows of several sequences —, the tensor width: the longest
    laid-out row, rounded up by `bucket_width` when `bucket`)."""
    starts = [branch_starts(row, share_prefixes and len(row) > 1) for row in rows]
    width = max(sum(len(seq.input_ids) - b for seq, b in zip(row, bs)) for row, bs in zip(rows, starts))
    return starts, bucket_width(width) if bucket else width


def layout_options(cfg) -> dict[str, bool]:
    """The collates' `share_prefixes` and `bucket` for a training run's config.

    `share_prefixes`: `share_prompt_prefix`, and the attention that reads branches (`train.attention`'s varlen,
    which packed rows get with `attn_implementation: auto`). `bucket`: `row_buckets`, where `auto` = training on
    a CPU (oneDNN's kernel cache)."""
    share = bool(getattr(cfg, "share_prompt_prefix", False)) and getattr(cfg, "attn_implementation", "auto") == "auto"
    mode = getattr(cfg, "row_buckets", "off")
    if mode == "auto":
        import torch

        bucket = not torch.cuda.is_available()
    else:
        bucket = mode == "on"
    return {"share_prefixes": share, "bucket": bucket}
