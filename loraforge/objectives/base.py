"""The record every training objective exports: what the loop minimizes, and what it needs from the data.

The loop itself knows one contract only: a loss module whose `forward(**batch)` returns `(sum of per-target
losses, number of targets)` for a micro-batch, and a count of targets per example, so a step's gradient is the
sum over all its micro-batches (and processes) divided by the step's targets — accumulation N × batch B equals
batch N·B for every objective. An `Objective` ties that loss module to the data it is trained on:

    build_data ─► examples ─► collate(micro-batch) ─► {batch_fields…} ─► loss(model, cfg)(**batch) ─► (sum, n)
                     └─► targets(example): the example's share of the step's normalizer

`loraforge/objectives/__init__.py` maps each objective's name to its record and a run config to its objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    from torch import nn

    from loraforge.config import RunConfig


@dataclass(frozen=True)
class Objective:
    """One training objective.

    Attributes:
        name: how the registry and run.json call it (`sft`, `seq_cls`, …).
        build_data: `(cfg, tokenizer) -> bundle` with `.train`, `.val` (or None) and `.stats` (a `DataStats`);
            classification bundles also give `.id2label` for the model's head.
        collate: `(examples, micro_batch, pad_token_id, cfg) -> dict of tensors` for one micro-batch
            (`micro_batch[r]` = example indices in row r).
        batch_fields: keys every collated batch holds, which the loss module reads.
        optional_fields: keys a collated batch may hold besides them (a packed SFT row has `position_ids`
            instead of an `attention_mask`).
        targets: `example -> int`, what the example adds to the step's normalizer (trained tokens, words,
            examples, pairs).
        loss: `(model, cfg) -> nn.Module` whose `forward(**batch)` returns `(loss sum, target count)`; it keeps
            the trained model as `.model`.
    """

    name: str
    build_data: Callable[[RunConfig, Any], Any]
    collate: Callable[[Sequence[Any], Sequence[Sequence[int]], int, RunConfig], dict[str, Any]]
    batch_fields: tuple[str, ...]
    targets: Callable[[Any], int]
    loss: Callable[[nn.Module, RunConfig], nn.Module]
    optional_fields: tuple[str, ...] = ()


def step_metrics(loss_module: Any, accelerator: Any, split: str = "train") -> dict[str, float]:
    """The objective's own metrics since the last call (means over examples, all processes), e.g. a preference
    objective's rewards/margins/accuracies; {} for objectives without any. The loop calls it once per log
    record (`split="train"`) and per evaluation (`"val"`, keys prefixed `val_`)."""
    import torch

    module = accelerator.unwrap_model(loss_module)
    pop = getattr(module, "pop_metrics", None)
    if pop is None:
        return {}
    out = {}
    for name, (total, count) in sorted(pop(split).items()):
        pair = torch.stack([total.float(), count.float()]).to(accelerator.device)
        if accelerator.num_processes > 1:
            pair = accelerator.reduce(pair, "sum")
        if pair[1] > 0:
            out[("val_" if split == "val" else "") + name] = (pair[0] / pair[1]).item()
    return out
