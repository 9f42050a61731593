"""The pieces of one `generate` call: its GenerationConfig, left padding, and where an answer ends (an end
token or a stop string)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from loraforge.inference.settings import GenerationSettings

if TYPE_CHECKING:  # pragma: no cover
    import torch


def generation_config(settings: GenerationSettings, end_ids: list[int], pad_id: int) -> Any:
    """A transformers GenerationConfig for `settings` that stops on any of `end_ids`."""
    from transformers import GenerationConfig

    kw: dict[str, Any] = dict(max_new_tokens=settings.max_new_tokens, eos_token_id=end_ids,
                              pad_token_id=pad_id, use_cache=True)  # prefix tuning needs the cache (FINDINGS 6)
    if settings.max_time:
        kw["max_time"] = settings.max_time
    if settings.greedy:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kw.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=None)
    return GenerationConfig(**kw)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(input_ids, attention_mask) of `rows` padded on the left, so every row's next token is the last column."""
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return input_ids, mask


def cut_after_end(rows: list[list[int]], end_ids: Sequence[int]) -> list[list[int]]:
    """Each row up to and including its first end token (the padding a finished row gets in a batch goes)."""
    ends = set(end_ids)
    return [row[: next((j + 1 for j, t in enumerate(row) if t in ends), len(row))] for row in rows]


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` cut before the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string (held back while
    streaming, since the next token may complete the stop string)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
