"""The training objective as one module, so DDP sees a single forward that returns (loss sum, trained tokens).

Returning the *sum* of token losses (not the mean) lets the loop normalize by the number of trained tokens in
the whole optimizer step — across micro-batches and processes — so accumulation N × batch B equals batch N·B.

Chunked loss: the LM head and cross-entropy run only on positions that have a label, a chunk at a time, under
activation checkpointing, so the `[tokens × vocab]` fp32 logits tensor never exists (for SmolLM2 at 4 × 512
tokens that tensor alone is 4·512·49152·4 B ≈ 400 MB, plus as much again for its gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def trained_token_count(labels: list[int]) -> int:
    """Positions that contribute to the loss: labels are shifted by one, so label 0 never counts."""
    return sum(1 for t in labels[1:] if t != IGNORE_INDEX)


class CausalLMLoss(nn.Module):
    """Wraps a causal LM (plain or PEFT). `forward(**batch) -> (sum of token losses, number of tokens)`."""

    def __init__(self, model: nn.Module, *, chunked: bool = True, chunk_tokens: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.chunked = chunked and _split_head(model) is not None

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None):
        if self.chunked:
            backbone, head = _split_head(self.model)
            hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state
            return chunked_lm_loss(hidden, head, labels, self.chunk_tokens)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False)
        logits = out.logits
        if logits.shape[1] != labels.shape[1]:  # prompt tuning prepends virtual tokens to the sequence
            logits = logits[:, -labels.shape[1]:]
        return lm_loss_sum(logits, labels)


class SeqLoss(nn.Module):
    """Any HF model whose forward takes `labels` and returns a mean loss (seq2seq, classification, QA,
    prefix/prompt tuning): the sum is recovered as mean × the number of counted targets the batch reports."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, num_targets: torch.Tensor, **batch):
        out = self.model(**batch)  # the loop sets config.use_cache=False before training
        return out.loss.float() * num_targets, num_targets


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropy over labelled positions (logits [B, T, V], labels [B, T])."""
    logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    target = labels[:, 1:].reshape(-1)
    n = (target != IGNORE_INDEX).sum()
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum"), n


def chunked_lm_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk_tokens: int):
    """Same value and gradients as `lm_loss_sum(head(hidden), labels)`, without materializing all logits."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    target = labels[:, 1:].reshape(-1)
    keep = target != IGNORE_INDEX
    h, target = h[keep], target[keep]  # prompt and padding positions never reach the LM head
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_tokens):
        # checkpoint: the chunk's logits are freed after forward and recomputed in backward
        total = total + checkpoint(_head_ce, head, h[start:start + chunk_tokens], target[start:start + chunk_tokens],
                                   use_reentrant=False)
    return total, keep.sum()


def _head_ce(head: nn.Module, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), target, reduction="sum")


def _split_head(model: nn.Module):
    """(backbone, lm_head) of a causal LM, or None when the logits need more than `head(hidden)`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", ""), None), "is_prompt_learning", False):
        return None  # prefix/prompt tuning inject virtual tokens in PeftModel.forward
    cfg = getattr(base, "config", None)
    if cfg is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    prefix = getattr(base, "base_model_prefix", "")
    backbone = getattr(base, prefix, None) if prefix else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if backbone is None or head is None or backbone is base:
        return None
    return backbone, head
