"""Full fine-tuning: every parameter trains. The run dir is a complete HF model (plus tokenizer)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loraforge.config.methods import FULL
from loraforge.errors import Problem
from loraforge.methods.base import Method, ModelShape, ParamEstimate

if TYPE_CHECKING:
    from torch import nn

    from loraforge.config import RunConfig
    from loraforge.methods.report import TrainableReport


def apply(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """Every parameter requires grad."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def verify(report: TrainableReport, cfg: RunConfig) -> list[Problem]:
    """Every parameter must train."""
    if report.trainable == report.total:
        return []
    return [Problem("method", f"full fine-tuning but only {report.percent:.1f}% of parameters are trainable",
                    value=cfg.method)]


def estimate_params(cfg: RunConfig, shape: ModelShape) -> ParamEstimate:
    """Every base parameter trains, and the graph spans every layer."""
    return ParamEstimate(trainable_base=frozenset(shape.params), every_layer_needs_grad=True)


METHOD = Method(options=FULL, apply=apply, saves_adapter=False, estimate_params=estimate_params, verify=verify)
