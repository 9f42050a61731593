"""SimPO (Meng et al. 2024, arXiv:2405.14734): no reference model; the reward is the length-normalized log-prob
β · (1/|y|) log πθ(y|x), and the loss −log σ(r_w − r_l − γ) asks for a margin γ (`simpo_gamma`). As in TRL's
CPOTrainer with `loss_type="simpo"`, `cpo_alpha=0`; `pref_label_smoothing` ε smooths it like conservative DPO.
"""

from __future__ import annotations

import torch.nn.functional as F

from loraforge.objectives.base import Objective
from loraforge.objectives.preference import (BATCH_FIELDS, OPTIONAL_FIELDS, SeqLogps, build_data, collate_pairs,
                                             make_loss, one_per_example, reward_metrics)


def simpo_losses(policy: SeqLogps, ref: None, batch, cfg):
    beta, eps = cfg.pref_beta, cfg.pref_label_smoothing
    avg = policy.means
    chosen, rejected = avg[0::2], avg[1::2]
    logits = chosen - rejected - cfg.simpo_gamma / beta
    losses = -(1 - eps) * F.logsigmoid(beta * logits) - eps * F.logsigmoid(-beta * logits)
    return losses, reward_metrics(beta * chosen.detach(), beta * rejected.detach(), policy)


OBJECTIVE = Objective(name="simpo", build_data=build_data, collate=collate_pairs, batch_fields=BATCH_FIELDS,
                      optional_fields=OPTIONAL_FIELDS, targets=one_per_example,
                      loss=make_loss(simpo_losses, needs_reference=False))
