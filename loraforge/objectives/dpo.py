"""DPO (Rafailov et al. 2023, arXiv:2305.18290) and its IPO and hinge variants, on pairs, against a reference.

With Δ = (log πθ(y_w|x) − log π_ref(y_w|x)) − (log πθ(y_l|x) − log π_ref(y_l|x)), summed over response tokens:
* `sigmoid`: −log σ(βΔ); with `pref_label_smoothing` ε, conservative DPO (1−ε)·(−log σ(βΔ)) + ε·(−log σ(−βΔ));
* `ipo` (Azar et al. 2023, Eq. 17): (Δ̄ − 1/(2β))², Δ̄ from per-token *averaged* log-ratios, as TRL does;
* `hinge` (SLiC, Zhao et al. 2023): max(0, 1 − βΔ).
With `dpo_sft_weight` α (RPO, Pang et al. 2024, arXiv:2404.19733) every pair's loss also gets α × the micro-batch's
mean negative log-likelihood per chosen-reply token, so the step's mean over pairs adds exactly TRL's `sft` term.
Rewards are β · log-ratio (TRL's `rewards/chosen`, `rewards/rejected`).
"""

from __future__ import annotations

import torch.nn.functional as F
import torch

from loraforge.objectives.base import Objective
from loraforge.objectives.preference import (BATCH_FIELDS, OPTIONAL_FIELDS, SeqLogps, build_data, collate_pairs,
                                             make_loss, one_per_example, reward_metrics)


def dpo_losses(policy: SeqLogps, ref: SeqLogps, batch, cfg):
    beta = cfg.pref_beta
    ratios = policy.sums - ref.sums  # [2P]: chosen, rejected, chosen, …
    chosen, rejected = ratios[0::2], ratios[1::2]
    delta = chosen - rejected
    if cfg.dpo_loss == "sigmoid":
        eps = cfg.pref_label_smoothing
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif cfg.dpo_loss == "ipo":
        counts = policy.counts.clamp_min(1)
        avg = ratios / counts
        losses = (avg[0::2] - avg[1::2] - 1 / (2 * beta)) ** 2
    elif cfg.dpo_loss == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:  # the schema's Literal admits no other value
        raise AssertionError(cfg.dpo_loss)
    metrics = reward_metrics(beta * chosen.detach(), beta * rejected.detach(), policy)
    if cfg.dpo_sft_weight:
        # one token-mean over the micro-batch's chosen replies (TRL's normalization), shared by its pairs
        nll = -policy.sums[0::2].sum() / policy.counts[0::2].sum().clamp_min(1)
        losses = losses + cfg.dpo_sft_weight * nll
        metrics["nll/chosen"] = nll.detach().expand(losses.shape[0])
    return losses, metrics


OBJECTIVE = Objective(name="dpo", build_data=build_data, collate=collate_pairs, batch_fields=BATCH_FIELDS,
                      optional_fields=OPTIONAL_FIELDS, targets=one_per_example,
                      loss=make_loss(dpo_losses, needs_reference=True))
