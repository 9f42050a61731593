"""KTO (Ethayarajh et al. 2024, arXiv:2402.01306, Eq. 7) on unpaired rows labelled desirable / undesirable.

With r = log πθ(y|x) − log π_ref(y|x) and the reference point z = max(0, mean over the micro-batch of the KL
sequences' log-ratios) — each prompt with another example's reply (TRL's: the replies rotated by one), detached:
desirable: w_d · (1 − σ(β(r − z))), undesirable: w_u · (1 − σ(β(z − r))); the loss is the mean over examples.
A micro-batch of sequences: the n examples (0…n−1), then their n KL sequences (n…2n−1).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from loraforge.data.templates import IGNORE_INDEX, Encoded
from loraforge.objectives.base import Objective
from loraforge.data.row_layout import layout_options
from loraforge.objectives.preference import (BATCH_FIELDS, OPTIONAL_FIELDS, SeqLogps, build_data,
                                             collate_sequences, make_loss, one_per_example, packs_rows)


def kl_sequence(prompt_of: Any, reply_of: Any) -> Encoded:
    """`prompt_of`'s prompt followed by `reply_of`'s reply (labels on the reply only)."""
    p, q = prompt_of.prompt_len, reply_of.prompt_len
    ids = prompt_of.encoded.input_ids[:p] + reply_of.encoded.input_ids[q:]
    return Encoded(ids, [IGNORE_INDEX] * p + reply_of.encoded.labels[q:], prompt_of.source)


def collate_kto(examples: Sequence[Any], micro_batch: Sequence[Sequence[int]], pad_token_id: int, cfg):
    order = [i for row in micro_batch for i in row]
    exs = [examples[i] for i in order]
    kl = [kl_sequence(exs[k], exs[k - 1]) for k in range(len(exs))]  # reply of the previous example (TRL's roll)
    if packs_rows(cfg):
        rows = [[e.encoded for e in exs] + kl]
    else:
        rows = [[e.encoded] for e in exs] + [[s] for s in kl]
    batch = collate_sequences(rows, pad_token_id, packs_rows(cfg), **layout_options(cfg))
    batch["desirable"] = torch.tensor([e.desirable for e in exs], dtype=torch.bool)
    return batch


def kto_losses(policy: SeqLogps, ref: SeqLogps, batch, cfg):
    beta = cfg.pref_beta
    n = batch["desirable"].shape[0]
    ratios = policy.sums - ref.sums
    r, kl_ratios = ratios[:n], ratios[n:]
    z = kl_ratios.mean().detach().clamp(min=0)
    good = batch["desirable"].to(r.device)
    losses = torch.where(good, cfg.kto_desirable_weight * (1 - torch.sigmoid(beta * (r - z))),
                         cfg.kto_undesirable_weight * (1 - torch.sigmoid(beta * (z - r))))
    rewards = beta * r.detach()
    metrics = {"rewards/chosen": rewards[good], "rewards/rejected": rewards[~good], "kl": z.reshape(1)}
    return losses, metrics


OBJECTIVE = Objective(name="kto", build_data=build_data, collate=collate_kto, batch_fields=BATCH_FIELDS,
                      optional_fields=OPTIONAL_FIELDS, targets=one_per_example,
                      loss=make_loss(kto_losses, needs_reference=True))
