"""The causal-LM loss (the `sft` objective's loss module, `loraforge/objectives/sft.py`): one module, so DDP sees a
single forward that returns (loss sum, trained tokens).

Returning the *sum* of token losses (not the mean) lets the loop normalize by the number of trained tokens in
the whole optimizer step — across micro-batches and processes — so accumulation N × batch B equals batch N·B.

Chunked loss: the LM head and cross-entropy run only on positions that have a label, a chunk at a time, with
the chunk's gradients computed at once (or, for a head that is not a plain Linear, under activation
checkpointing), so the `[tokens × vocab]` fp32 logits tensor never exists (for SmolLM2 at 4 × 512
tokens that tensor alone is 4·512·49152·4 B ≈ 400 MB, plus as much again for its gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from loraforge.train.attention import check_branches_are_read

IGNORE_INDEX = -100


def trained_token_count(labels: list[int]) -> int:
    """Positions that contribute to the loss: labels are shifted by one, so label 0 never counts."""
    return sum(1 for t in labels[1:] if t != IGNORE_INDEX)


# Labelled positions per LM-head chunk. Small chunks keep each chunk's [chunk × vocab] fp32 logits under glibc's
# mmap threshold, so they are reused from the heap instead of page-faulted in again (measured on SmolLM2 under
# bf16, one thread: 128 → 0.86 s per 1,010 tokens, 1024 → 1.05 s; 32 is slower again).
DEFAULT_CHUNK_TOKENS = 128
# The preference losses' per-token log-probs. Through a frozen linear head (`_FrozenHeadLogp`) a chunk's logits
# become its input gradient at once, in place, so one `[chunk × vocab]` fp32 buffer is alive at a time; through
# any other head each chunk is checkpointed (logits, softmax and their gradients alive together in backward), so
# those chunks are small. The head matmul of a 32-token chunk reads the whole `[vocab × hidden]` weight for 32
# rows: SmolLM2's head ran at 43 GFLOP/s there vs 70 at 128 rows (fp32, 2 AVX2 cores).
LOGP_CHUNK_TOKENS = 128
CHECKPOINTED_LOGP_CHUNK_TOKENS = 32


class CausalLMLoss(nn.Module):
    """Wraps a causal LM (plain or PEFT). `forward(**batch) -> (sum of token losses, number of tokens)`."""

    def __init__(self, model: nn.Module, *, chunked: bool = True, chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.chunked = chunked and _split_head(model) is not None

    def backbone_and_head(self):
        """(backbone, LM head) when the loss calls them separately (the fused path), else None."""
        return _split_head(self.model) if self.chunked else None

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None):
        check_branches_are_read(self.model, position_ids)
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
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters()))
    if needs_grad and type(head) is nn.Linear:
        return _FusedLinearCrossEntropy.apply(h, head.weight, head.bias, target, chunk_tokens), keep.sum()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_tokens):
        chunk = (head, h[start:start + chunk_tokens], target[start:start + chunk_tokens])
        # checkpoint (any other head, e.g. one LoRA adapts): the chunk's logits are freed after forward and
        # recomputed in backward
        total = total + (checkpoint(_head_ce, *chunk, use_reentrant=False) if needs_grad else _head_ce(*chunk))
    return total, keep.sum()


def _head_ce(head: nn.Module, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), target, reduction="sum")


def _head_in_compute_dtype(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """(dtype, weight, bias) for a fused LM-head kernel's matmuls: the autocast dtype when autocast is on (as
    autocast's `F.linear` would cast them), else h's dtype."""
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    return dtype, weight.to(dtype), bias.to(dtype) if bias is not None else None


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Σ cross_entropy(h Wᵀ + b, target) with its gradients computed chunk by chunk during forward.

    The chunk's logits are turned into d loss / d logits (softmax − one-hot) at once and contracted with W
    (and h, when W trains), so they are never kept or recomputed: one LM-head matmul fewer than checkpointing
    per chunk. Under autocast the matmuls run in the autocast dtype and the softmax in fp32, as
    `F.cross_entropy(head(h).float(), ...)` does.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                chunk_tokens: int) -> torch.Tensor:
        dtype, w, b = _head_in_compute_dtype(h, weight, bias)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_tokens):
            hc, tc = h[start:start + chunk_tokens].to(dtype), target[start:start + chunk_tokens]
            logits = F.linear(hc, w, b).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            d_logits = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            d_logits[torch.arange(tc.shape[0], device=tc.device), tc] -= 1.0
            d_logits = d_logits.to(dtype)
            if grad_h is not None:
                grad_h[start:start + chunk_tokens] = d_logits.matmul(w).to(h.dtype)
            if grad_w is not None:
                grad_w += d_logits.t().matmul(hc).float()
            if grad_b is not None:
                grad_b += d_logits.float().sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = lambda g, dt=None: None if g is None else (g * grad_out).to(dt or g.dtype)  # noqa: E731
        return scale(grad_h), scale(grad_w, ctx.dtypes[0]), scale(grad_b, ctx.dtypes[1]), None, None


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


def chunked_token_logps(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                        chunk_tokens: int = LOGP_CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the labelled next tokens, without the `[tokens × vocab]` logits (preference losses).

    Only labelled positions reach the head, a chunk at a time; under autograd each chunk is checkpointed, so its
    logits are freed after forward and recomputed in backward (the SFT path above is untouched).

    Returns:
        (logps [N] fp32 in row-major order of the labelled positions, keep [B·(T-1)] bool: which shifted
        positions they are).
    """
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    target = labels[:, 1:].reshape(-1)
    keep = target != IGNORE_INDEX
    h, target = h[keep], target[keep]
    if type(head) is nn.Linear and not any(p.requires_grad for p in head.parameters()):
        return _FrozenHeadLogp.apply(h, head.weight, head.bias, target, chunk_tokens), keep
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters()))
    parts = []
    chunk_tokens = min(chunk_tokens, CHECKPOINTED_LOGP_CHUNK_TOKENS)
    for start in range(0, h.shape[0], chunk_tokens):
        chunk = (head, h[start:start + chunk_tokens], target[start:start + chunk_tokens])
        parts.append(checkpoint(_head_logp, *chunk, use_reentrant=False) if needs_grad else _head_logp(*chunk))
    return (torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)), keep


def _head_logp(head: nn.Module, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()
    return logits.gather(1, target[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


class _FrozenHeadLogp(torch.autograd.Function):
    """log p(target | h) per position through a frozen linear head, its input gradient computed during forward.

    d logp / d logits = one-hot − softmax, so each chunk's logits are turned into it in place and contracted with
    W right away: `[positions × hidden]` is kept for backward, never logits, and nothing is recomputed (one head
    matmul fewer than checkpointing). Backward scales each position's row by its incoming gradient. Under
    autocast the matmuls run in the autocast dtype and the softmax in fp32, as `head(h).float()` does. A head
    that trains would need the incoming gradients for its weight gradient: `chunked_token_logps` checkpoints it.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                chunk_tokens: int) -> torch.Tensor:
        dtype, w, b = _head_in_compute_dtype(h, weight, bias)
        logps = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        for start in range(0, h.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            tc = target[rows]
            logits = F.linear(h[rows].to(dtype), w, b).float()
            picked = logits.gather(1, tc[:, None]).squeeze(1)
            # log-sum-exp in place (torch.logsumexp would allocate a second [chunk × vocab] buffer)
            top = logits.amax(dim=-1, keepdim=True)
            total = logits.sub_(top).exp_().sum(dim=-1, keepdim=True)
            logps[rows] = picked - (top + total.log()).squeeze(1)
            if grad_h is not None:
                d_logits = logits.div_(total).neg_()  # −softmax, in place of the logits
                d_logits[torch.arange(tc.shape[0], device=tc.device), tc] += 1.0
                grad_h[rows] = d_logits.to(dtype).matmul(w).to(h.dtype)
        ctx.save_for_backward(grad_h)
        return logps

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_out[:, None].to(grad_h.dtype), None, None, None, None


def token_logps(model: nn.Module, input_ids, labels, attention_mask=None, position_ids=None,
                chunk_tokens: int = LOGP_CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """`chunked_token_logps` of a causal LM's batch: backbone + chunked head when the head splits off, else the
    model's full logits (heads with soft-capping or logit scaling)."""
    check_branches_are_read(model, position_ids)
    split = _split_head(model)
    if split is not None:
        backbone, head = split
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
        return chunked_token_logps(hidden, head, labels, chunk_tokens)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False).logits[:, -labels.shape[1]:]
    target = labels[:, 1:].reshape(-1)
    keep = target != IGNORE_INDEX
    lp = torch.log_softmax(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), dim=-1)[keep]
    return lp.gather(1, target[keep][:, None]).squeeze(1), keep
