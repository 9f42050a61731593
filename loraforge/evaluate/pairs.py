"""Held-out preference pairs: does a model prefer the chosen reply, and do its own answers read like it?

* `pair_margins`: per pair, log π(chosen | prompt) − log π(rejected | prompt), summed over the reply tokens
  (with the end-of-turn token), teacher-forced with the training encoder (`data/preference.py`), so the prompt is
  rendered exactly as in training. A margin > 0 means the model ranks the pair as the data does; its rate over
  held-out pairs is *pair accuracy*. Unlike DPO's `rewards/accuracies` it needs no reference model, so the base
  model has one too (about chance when the two sides are alike in length and fluency).
* `style_rate`: the share of greedy answers that contain any of a list of marker phrases of the chosen style.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from loraforge.data.preference import PairExample
from loraforge.inference import BASE, GenerationSettings, InferenceModel
from loraforge.objectives.preference import collate_sequences, sequence_logps


def pair_margins(model: InferenceModel, examples: Sequence[PairExample], adapter: str = BASE,
                 pairs_per_batch: int = 4) -> list[float]:
    """Chosen minus rejected summed reply log-prob of every pair, with `adapter` (`base`: no adapter)."""
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    margins: list[float] = []
    with torch.no_grad(), model.forward_module(adapter) as module:
        for start in range(0, len(examples), pairs_per_batch):
            chunk = examples[start:start + pairs_per_batch]
            batch = collate_sequences([ex.sides for ex in chunk], pad, pack=False)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            sums = sequence_logps(module, batch).sums.tolist()
            margins += [sums[2 * i] - sums[2 * i + 1] for i in range(len(chunk))]
    return margins


def pair_accuracy(margins: Sequence[float]) -> float:
    return sum(m > 0 for m in margins) / max(len(margins), 1)


def style_rate(model: InferenceModel, prompts: Sequence[Any], markers: Sequence[str], adapter: str = BASE,
               max_new_tokens: int = 48) -> tuple[float, list[str]]:
    """(share of greedy answers containing any marker, case-insensitive; the answers)."""
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0)
    answers = [r.text for r in model.generate_batch(list(prompts), adapter=adapter, settings=settings)]
    hits = sum(any(m.lower() in a.lower() for m in markers) for a in answers)
    return hits / max(len(answers), 1), answers


__all__ = ["pair_accuracy", "pair_margins", "style_rate"]
