"""Supervised fine-tuning of a causal LM: the token-summed next-token cross-entropy over the trained (reply)
tokens, through the fused chunked LM head (`train/loss.py:CausalLMLoss`), on chat / alpaca rows
(`data/dataset.py`), padded or packed (`data/batching.py`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from loraforge.data.batching import collate as collate_rows
from loraforge.data.dataset import build_datasets
from loraforge.objectives.base import Objective
from loraforge.train.loss import CausalLMLoss, trained_token_count

if TYPE_CHECKING:
    from torch import nn

    from loraforge.config import RunConfig


def collate(examples: Sequence[Any], micro_batch: Sequence[Sequence[int]], pad_token_id: int, cfg: RunConfig):
    """`input_ids` + `labels`, and an `attention_mask` (one example per row) or `position_ids` (packed rows)."""
    from loraforge.data.row_layout import layout_options

    return collate_rows(examples, micro_batch, pad_token_id, **layout_options(cfg))


def targets(example: Any) -> int:
    """Labelled next-token positions (the first label of an example is never a target)."""
    return trained_token_count(example.labels)


def loss(model: nn.Module, cfg: RunConfig) -> nn.Module:
    return CausalLMLoss(model, chunked=cfg.chunked_loss)


OBJECTIVE = Objective(name="sft", build_data=build_datasets, collate=collate, batch_fields=("input_ids", "labels"),
                      optional_fields=("attention_mask", "position_ids"), targets=targets, loss=loss)
