"""The task-type objectives whose loss the transformers model computes itself from `labels` (or answer
positions): SEQ_2_SEQ_LM, SEQ_CLS, TOKEN_CLS and extractive QUESTION_ANSWERING, on the task rows of
`data/tasks.py`. The model returns a mean; `ModelLoss` turns it back into a sum over the batch's targets, so the
loop's token-normalized accumulation treats them like every other objective.

What the mean is taken over (and so `num_targets`): target tokens (seq2seq), examples (classification, QA),
labelled words (token classification) — see `data/tasks.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from loraforge.data.tasks import build_task_datasets, collate_task
from loraforge.objectives.base import Objective

if TYPE_CHECKING:
    from loraforge.config import RunConfig


class ModelLoss(nn.Module):
    """Any HF model whose forward takes the targets and returns a mean loss (seq2seq, classification, QA,
    prefix/prompt tuning): `forward(num_targets, **model_inputs) -> (mean × num_targets, num_targets)`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, num_targets: torch.Tensor, **batch):
        out = self.model(**batch)  # the trainer sets config.use_cache=False before training
        return out.loss.float() * num_targets, num_targets


def collate_task_rows(examples: Sequence[Any], micro_batch: Sequence[Sequence[int]], pad_token_id: int,
                      cfg: RunConfig):
    """The task's model inputs and targets, plus `num_targets` (see `data.tasks.collate_task`)."""
    return collate_task(examples, micro_batch, pad_token_id, cfg.task_type)


def num_targets(example: Any) -> int:
    """The targets the model's mean loss is taken over for this example (`TaskExample.num_targets`)."""
    return example.num_targets


def model_loss(model: nn.Module, cfg: RunConfig) -> nn.Module:
    return ModelLoss(model)


def _task_objective(name: str, *fields: str) -> Objective:
    return Objective(name=name, build_data=build_task_datasets, collate=collate_task_rows,
                     batch_fields=("input_ids", "attention_mask", *fields, "num_targets"), targets=num_targets,
                     loss=model_loss)


SEQ2SEQ = _task_objective("seq2seq", "labels")
SEQ_CLS = _task_objective("seq_cls", "labels")
TOKEN_CLS = _task_objective("token_cls", "labels")
EXTRACTIVE_QA = _task_objective("extractive_qa", "start_positions", "end_positions")
