"""FEATURE_EXTRACTION: contrastive sentence embeddings (InfoNCE with in-batch negatives).

Embeddings are the attention-masked mean of the last hidden states, L2-normalized; each anchor must pick its own
positive among all positives of the micro-batch, at temperature 0.05 — the "MultipleNegativesRanking" objective
of Sentence-BERT / supervised SimCSE (Gao et al. 2021, arXiv:2104.08821). The bare model has no loss of its own,
so `ContrastiveLoss` computes it. Rows `{anchor, positive}` are read by `data/tasks.py`; a collated batch stacks
the B anchors, then their B positives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.objectives.base import Objective
from loraforge.data.tasks import build_task_datasets
from loraforge.objectives.model_loss import collate_task_rows, num_targets

if TYPE_CHECKING:
    from loraforge.config import RunConfig

TEMPERATURE = 0.05  # SimCSE's value; cosine similarities / 0.05 give a usable softmax range


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Masked mean of hidden states [B, T', H] → [B, H]. When the model prepended virtual tokens (prompt tuning,
    P-tuning: T' > T), only the real tokens' states (the last T) are pooled."""
    hidden = hidden[:, -attention_mask.shape[1]:]
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def embed(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """L2-normalized sentence embeddings (masked mean of the last hidden states) from a bare or PEFT model."""
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return F.normalize(mean_pool(hidden, attention_mask).float(), dim=-1)


def contrastive_loss_sum(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         temperature: float = TEMPERATURE) -> torch.Tensor:
    """Sum over the B anchors of InfoNCE: rows [0, B) are anchors, rows [B, 2B) their positives."""
    emb = embed(model, input_ids, attention_mask)
    b = emb.shape[0] // 2
    scores = emb[:b] @ emb[b:].T / temperature  # [B, B]: anchor i vs every positive; the diagonal is right
    return F.cross_entropy(scores, torch.arange(b, device=scores.device), reduction="sum")


class ContrastiveLoss(nn.Module):
    """`forward(num_targets, input_ids, attention_mask) -> (sum of per-anchor losses, number of anchors)`."""

    def __init__(self, model: nn.Module, temperature: float = TEMPERATURE):
        super().__init__()
        self.model = model
        self.temperature = temperature

    def forward(self, num_targets: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return contrastive_loss_sum(self.model, input_ids, attention_mask, self.temperature), num_targets


def contrastive_loss(model: nn.Module, cfg: RunConfig) -> nn.Module:
    return ContrastiveLoss(model)


OBJECTIVE = Objective(name="contrastive", build_data=build_task_datasets, collate=collate_task_rows,
                      batch_fields=("input_ids", "attention_mask", "num_targets"), targets=num_targets,
                      loss=contrastive_loss)
