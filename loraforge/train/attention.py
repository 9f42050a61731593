"""Variable-length attention for padding-free packed rows.

A packed row holds several examples; their `position_ids` restart at 0 at each example. transformers' own
path (sdpa/eager, `use_cache=False`, no attention mask) builds one `[T × T]` block-diagonal mask for the whole
row and runs attention over all T² query/key pairs — on a row of four ~320-token examples that is ~4× the
work of attending within each example, and SDPA cannot use its causal fast path under an explicit mask.

`varlen_attention_forward` splits the row where the position ids restart and runs causal SDPA per example
(the kernel skips the upper triangle), so attention costs Σ Lᵢ²/2 like padded-per-example attention, with no
padding. A packed row may also hold *branches* (`data.row_layout`): a sequence whose positions start at p > 0
shares its first p tokens with the row's latest sequence that starts at 0, and attends to those first. It is
registered in transformers' `AttentionInterface` under `VARLEN`, with sdpa's mask function, so a
batch that is *not* packed (validation rows with an attention mask) goes through plain sdpa unchanged.
Same loss and gradients as the padded batch: tests/test_perf_packing.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch
    from torch import nn

VARLEN = "loraforge_varlen"
# torch's CPU flash-attention kernel is faster in fp32 than in bf16 on short sequences (measured forward +
# backward, 9 query / 3 key-value heads of 64, 2 threads, fp32 including the casts: 2.26 vs 2.54 ms at 192
# tokens; from 256 on bf16 wins: 4.02 vs 3.74 at 256, 6.00 vs 5.49 at 320, 11.0 vs 9.9 at 448), so under CPU
# autocast segments up to this length attend in fp32 — also the more accurate choice. Key/value heads are
# shared through `enable_gqa` rather than repeated (copies).
CPU_FP32_MAX_LEN = 224


def register_varlen_attention() -> str:
    """Register the varlen attention (idempotent) and return its name for `model.set_attn_implementation`."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, sdpa_mask)
    return VARLEN


class Segment(NamedTuple):
    """One sequence of a packed row: tokens [start, end), and for a branch (`data.row_layout`) the row span
    `prefix` of the root tokens it reads before its own."""

    start: int
    end: int
    prefix: tuple[int, int] | None = None


def packed_segments(position_ids: "torch.Tensor | None") -> list[Segment] | None:
    """The sequences of a single packed row (a new one wherever the position does not follow the previous one),
    or None when there is no such row to split (batch of several rows, no ids).

    A sequence whose positions start at 0 is a root; one starting at p > 0 is a branch of the latest root and
    reads that root's first p tokens first (a shared prompt laid out once)."""
    import torch

    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        return None
    pos = position_ids[0]
    starts = torch.nonzero(torch.diff(pos, prepend=pos[:1] - 1) != 1).flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    first = pos[starts].tolist()
    segments: list[Segment] = []
    root: Segment | None = None
    for s, e, p in zip(starts, starts[1:] + [pos.shape[0]], first):
        if p > 0 and root is not None and p <= root.end - root.start:
            segments.append(Segment(s, e, (root.start, root.start + p)))
        else:
            root = Segment(s, e)
            segments.append(root)
    return segments


def varlen_attention_forward(module: "nn.Module", query: "torch.Tensor", key: "torch.Tensor", value: "torch.Tensor",
                             attention_mask: "torch.Tensor | None", dropout: float = 0.0, scaling: float | None = None,
                             **kwargs) -> tuple["torch.Tensor", None]:
    """transformers attention-function signature: q/k/v `[B, heads, T, head_dim]` → (`[B, T, heads, head_dim]`, None)."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows = row_segments(kwargs.get("position_ids"), query.shape[0])
    cache = kwargs.get("past_key_values") or kwargs.get("past_key_value")
    if rows is None or cache is not None or key.shape[2] != query.shape[2] or kwargs.get("softcap") is not None:
        # not packed training rows (no position ids, generation with a cache, ...): plain sdpa with its mask
        refuse_branches(rows, "not with soft-capped attention or a KV cache: use a model without soft-capping")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa = query.shape[1] != key.shape[1]  # grouped-query attention: one key/value head serves several query heads
    upcast = query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16)

    def attend(b: slice, seg: Segment) -> "torch.Tensor":
        s, e = seg.start, seg.end
        q, k, v = query[b, :, s:e], key[b, :, s:e], value[b, :, s:e]
        mask = None
        if seg.prefix is not None:  # a branch: the root's first p tokens, then itself causally
            ps, pe = seg.prefix
            k, v = torch.cat([key[b, :, ps:pe], k], dim=2), torch.cat([value[b, :, ps:pe], v], dim=2)
            mask = torch.ones(e - s, k.shape[2], dtype=torch.bool, device=q.device).tril(pe - ps)
        if upcast and e - s <= CPU_FP32_MAX_LEN:
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                             is_causal=mask is None, enable_gqa=gqa)
        return out.to(query.dtype)

    if len(rows) == 1:  # one row, or rows that share one set of position ids
        parts = [[attend(slice(None), seg) for seg in rows[0]]]
    else:
        parts = [[attend(slice(r, r + 1), seg) for seg in segments] for r, segments in enumerate(rows)]
    out = _joined(parts)
    saves = getattr(module, "_loraforge_saves", None)  # LoRA training (methods.lora_blocks): o_proj's input is
    if saves is not None:  # joined again in backward from the segments' outputs the kernel keeps anyway
        saves.recompute(out, _joined, parts)
    return out, None


def _joined(parts: "list[list[torch.Tensor]]") -> "torch.Tensor":
    """Each row's segment outputs `[1 or B, heads, len, head_dim]` joined into `[B, T, heads, head_dim]`."""
    import torch

    rows = [p[0] if len(p) == 1 else torch.cat(p, dim=2) for p in parts]
    return (rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)).transpose(1, 2).contiguous()


def row_segments(position_ids: "torch.Tensor | None", batch: int) -> list[list[Segment]] | None:
    """`packed_segments` of each row (one list when all rows share one `[1, T]` set of ids), or None."""
    if position_ids is None or position_ids.dim() != 2:
        return None
    if position_ids.shape[0] == 1:
        return [packed_segments(position_ids)]
    if position_ids.shape[0] != batch:
        return None
    return [packed_segments(position_ids[r:r + 1]) for r in range(batch)]


def refuse_branches(rows: list[list[Segment]] | None, why: str) -> None:
    """Raise if `rows` hold shared-prefix branches: an attention other than the varlen one would read each branch
    as a sequence of its own, a silently wrong loss. `why`: when this happens, for the message."""
    if rows is not None and any(seg.prefix is not None for segments in rows for seg in segments):
        raise ValueError(f"this packed row shares prompt prefixes, which only loraforge's varlen attention reads "
                         f"({why}); or set `share_prompt_prefix: false`")


def check_branches_are_read(model: "nn.Module", position_ids: "torch.Tensor | None") -> None:
    """Refuse a packed row holding shared-prefix branches when the model's attention is not the varlen one.

    Raises:
        ValueError: the row has branches and the model's attention implementation is not `VARLEN`.
    """
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if position_ids is None or impl == VARLEN:
        return
    refuse_branches(row_segments(position_ids, position_ids.shape[0]),
                    f"this model's attention is `{impl}`: load it the way `train` does, with "
                    "`set_attn_implementation(register_varlen_attention())`")


def attention_for(attn_implementation: str, batching: str) -> str:
    """The attention a run uses: varlen for packed rows unless the config names a kernel itself."""
    return VARLEN if batching == "packed" and attn_implementation == "auto" else attn_implementation
