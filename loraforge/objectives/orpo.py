"""ORPO (Hong et al. 2024, arXiv:2403.07691): SFT on the chosen reply plus an odds-ratio penalty, no reference.

Per pair: −(1/|y_w|) log πθ(y_w|x) − λ · log σ(log odds(y_w) − log odds(y_l)), with odds(y) = p/(1−p) of the
length-normalized probability p = exp((1/|y|) log πθ(y|x)) (Eq. 4 and 7; λ = `orpo_lambda`, TRL's `beta`).
The NLL is the chosen reply's mean per token (the prompt is never trained, as everywhere in loraforge; TRL's
ORPOTrainer also trains its NLL term on the prompt). Rewards are λ · mean log-prob, as TRL logs them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loraforge.objectives.base import Objective
from loraforge.objectives.preference import (BATCH_FIELDS, OPTIONAL_FIELDS, SeqLogps, build_data, collate_pairs,
                                             make_loss, one_per_example, reward_metrics)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, numerically stable on both sides of −log 2 (Mächler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def odds_ratio_terms(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """log σ(log odds ratio) of mean log-probs (the quantity TRL's `odds_ratio_loss` scales by λ)."""
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return F.logsigmoid(log_odds)


def orpo_losses(policy: SeqLogps, ref: None, batch, cfg):
    lam = cfg.orpo_lambda
    avg = policy.means
    chosen, rejected = avg[0::2], avg[1::2]
    losses = -chosen - lam * odds_ratio_terms(chosen, rejected)
    metrics = reward_metrics(lam * chosen.detach(), lam * rejected.detach(), policy)
    metrics["nll_loss"] = -chosen.detach()
    return losses, metrics


OBJECTIVE = Objective(name="orpo", build_data=build_data, collate=collate_pairs, batch_fields=BATCH_FIELDS,
                      optional_fields=OPTIONAL_FIELDS, targets=one_per_example,
                      loss=make_loss(orpo_losses, needs_reference=False))
