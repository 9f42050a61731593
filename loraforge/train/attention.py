"""Variable-length attention for padding-free packed rows.

A packed row holds several examples; their `position_ids` restart at 0 at each example. transformers' own
path (sdpa/eager, `use_cache=False`, no attention mask) builds one `[T × T]` block-diagonal mask for the whole
row and runs attention over all T² query/key pairs — on a row of four ~320-token examples that is ~4× the
work of attending within each example, and SDPA cannot use its causal fast path under an explicit mask.

`varlen_attention_forward` splits the row where the position ids restart and runs causal SDPA per example
(the kernel skips the upper triangle), so attention costs Σ Lᵢ²/2 like padded-per-example attention, with no
padding. It is registered in transformers' `AttentionInterface` under `VARLEN`, with sdpa's mask function, so a
batch that is *not* packed (validation rows with an attention mask) goes through plain sdpa unchanged.
Same loss and gradients as the padded batch: tests/test_perf_packing.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

VARLEN = "loraforge_varlen"
# torch's CPU flash-attention kernel is faster in fp32 than in bf16 on short sequences (measured forward +
# backward, 9 query / 3 key-value heads of 64, one thread: 2.1 vs 4.0 ms at 128 tokens, 6.9 vs 8.8 at 256,
# 16.4 vs 17.4 at 384, even at 512), so under CPU autocast segments up to this length attend in fp32 — also
# the more accurate choice. Key/value heads are shared through `enable_gqa` rather than repeated (copies).
CPU_FP32_MAX_LEN = 512


def register_varlen_attention() -> str:
    """Register the varlen attention (idempotent) and return its name for `model.set_attn_implementation`."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, sdpa_mask)
    return VARLEN


def packed_segments(position_ids: "torch.Tensor | None") -> list[tuple[int, int]] | None:
    """[(start, end)] of each example in a single packed row (a new example wherever the position does not
    follow the previous one), or None when there is no such row to split (batch of several rows, no ids)."""
    import torch

    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    pos = position_ids[0]
    starts = torch.nonzero(torch.diff(pos, prepend=pos[:1] - 1) != 1).flatten().tolist()
    if len(starts) <= 1 and (not starts or starts[0] == 0):
        return [(0, pos.shape[0])]
    bounds = starts + [pos.shape[0]]
    if bounds[0] != 0:
        bounds = [0] + bounds
    return list(zip(bounds[:-1], bounds[1:]))


def varlen_attention_forward(module: "nn.Module", query: "torch.Tensor", key: "torch.Tensor", value: "torch.Tensor",
                             attention_mask: "torch.Tensor | None", dropout: float = 0.0, scaling: float | None = None,
                             **kwargs) -> tuple["torch.Tensor", None]:
    """transformers attention-function signature: q/k/v `[B, heads, T, head_dim]` → (`[B, T, heads, head_dim]`, None)."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    segments = packed_segments(kwargs.get("position_ids"))
    cache = kwargs.get("past_key_values") or kwargs.get("past_key_value")
    if segments is None or cache is not None or key.shape[2] != query.shape[2] or kwargs.get("softcap") is not None:
        # not a packed training row (several rows, generation with a cache, ...): plain sdpa with its mask
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa = query.shape[1] != key.shape[1]  # grouped-query attention: one key/value head serves several query heads
    upcast = query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16)

    def attend(s: int, e: int) -> "torch.Tensor":
        q, k, v = query[:, :, s:e], key[:, :, s:e], value[:, :, s:e]
        if upcast and e - s <= CPU_FP32_MAX_LEN:
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True,
                                             enable_gqa=gqa)
        return out.to(query.dtype)

    parts = [attend(s, e) for s, e in segments]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return out.transpose(1, 2).contiguous(), None


def attention_for(attn_implementation: str, batching: str) -> str:
    """The attention a run uses: varlen for packed rows unless the config names a kernel itself."""
    return VARLEN if batching == "packed" and attn_implementation == "auto" else attn_implementation
