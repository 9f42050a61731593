"""Teacher-forced loss of each example's final answer, rendered exactly as in training.

The prompt goes through `loraforge.data.templates.encode_conversation` with the template and system prompt the
variant was trained with, and only the tokens of the final answer count, so the number is comparable with the
training run's `val_loss`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from loraforge.evaluate.examples import EvalExample
from loraforge.evaluate.options import EvalOptions
from loraforge.inference.settings import BASE

if TYPE_CHECKING:  # pragma: no cover
    from loraforge.inference import InferenceModel

IGNORE_INDEX = -100
_NO_CUTOFF = 1 << 30


def _encode_for_loss(model: "InferenceModel", name: str, ex: EvalExample,
                     options: EvalOptions) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated) of prompt + answer; labels keep only the final answer's tokens."""
    from loraforge.data.templates import encode_conversation

    template, system = model.prompt_settings(name)
    messages = [dict(m) for m in ex.messages]
    if system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})  # as InferenceModel does for generation
    messages.append({"role": "assistant", "content": ex.answer})
    # Encode in full first: the final answer's span must be found before truncation, or a cut-off answer
    # would leave an earlier reply's tokens looking like "the last labelled span".
    encoded, _ = encode_conversation(model.tokenizer, messages, template=template, cutoff_len=_NO_CUTOFF,
                                     train_on_prompt=False)
    ids, labels = list(encoded.input_ids), list(encoded.labels)
    # Earlier assistant turns (multi-turn context) are trained on in training, but here only the final answer
    # is tested: keep the last contiguous run of labelled tokens.
    end = max((i for i, t in enumerate(labels) if t != IGNORE_INDEX), default=-1)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    labels = [t if start <= i <= end else IGNORE_INDEX for i, t in enumerate(labels)]
    # Like training: keep the start, cut the end (the answer, or part of it, may be lost).
    truncated = len(ids) > options.cutoff_len
    return ids[: options.cutoff_len], labels[: options.cutoff_len], truncated


def answer_losses(model: "InferenceModel", name: str, examples: Sequence[EvalExample],
                  options: EvalOptions) -> tuple[list[tuple[float | None, int]], int, int]:
    """Teacher-forced answer loss of every example for variant `name`: ([(summed NLL or None, answer tokens)],
    total tokens, number truncated). None where truncation left no answer token."""
    import torch

    encoded = [_encode_for_loss(model, name, ex, options) for ex in examples]
    n_truncated = sum(1 for _, _, cut in encoded if cut)
    results: list[tuple[float | None, int]] = [(None, 0)] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(encoded[i][0]))  # similar lengths share a batch
    order = [i for i in order if any(t != IGNORE_INDEX for t in encoded[i][1])]
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    info = model.adapter_info(name) if name != BASE else None
    # Left padding puts every answer at the end of the batch, so the model only has to compute logits for the
    # last few positions (`logits_to_keep`): full logits are batch × length × vocabulary floats, gigabytes for
    # a 150k vocabulary at 1024 tokens. Prompt-learning adapters keep right padding, because their output
    # changes with left padding (FINDINGS trap 5), and compute full logits.
    accepts = _forward_parameters(model.model)
    left = not (info is not None and info.prompt_learning)
    with model.forward_module(name) as module, torch.inference_mode():
        for b in range(0, len(order), options.batch_size):
            rows = order[b: b + options.batch_size]
            sums, counts = _batch_nll(module, [encoded[i][:2] for i in rows], pad, left, accepts, model.device)
            for r, i in enumerate(rows):
                results[i] = (sums[r], counts[r])
    total_tokens = sum(count for _, count in results)
    return results, total_tokens, n_truncated


def _batch_nll(module: Any, rows: list[tuple[list[int], list[int]]], pad: int, left: bool, accepts: set[str],
               device: Any) -> tuple[list[float], list[int]]:
    """Summed answer-token NLL and answer-token count of each (input_ids, labels) row, in one forward pass."""
    import torch
    import torch.nn.functional as F

    width = max(len(seq) for seq, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (seq, lab) in enumerate(rows):
        at = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[r, at], labels[r, at], mask[r, at] = torch.tensor(seq), torch.tensor(lab), 1
    kwargs: dict[str, Any] = {}
    keep = width
    if left and "position_ids" in accepts:
        # positions count real tokens only, so absolute position embeddings see no padding
        kwargs["position_ids"] = (mask.cumsum(dim=1) - 1).clamp(min=0).to(device)
    if left and "logits_to_keep" in accepts:
        first_label = int((labels != IGNORE_INDEX).int().argmax(dim=1).min())
        keep = width - first_label + 1  # the logits at first_label - 1 predict the first answer token
        kwargs["logits_to_keep"] = keep
    out = module(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **kwargs)
    # The logits cover the last `keep` positions (prompt tuning prepends virtual-token positions before
    # them). Logits at position t predict the token at t + 1.
    logits = out.logits[:, -keep:, :].float()
    targets = labels[:, width - keep + 1:].to(logits.device)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="none").view(len(rows), keep - 1)
    counts = (targets != IGNORE_INDEX).sum(dim=1)
    return [float(nll[r].sum()) for r in range(len(rows))], [int(counts[r]) for r in range(len(rows))]


def _forward_parameters(module: Any) -> set[str]:
    """Names the model's forward accepts explicitly (not all architectures take position_ids or
    logits_to_keep)."""
    import inspect

    return set(inspect.signature(module.forward).parameters)
