"""What is actually trainable, computed from `requires_grad` on the built model — and checked against the config.

A known failure elsewhere: a "freeze" flag that was parsed but never applied, so every layer trained. Here the
report is the ground truth and training refuses to start when it disagrees with what the config asked for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loraforge.errors import Problem

if TYPE_CHECKING:
    from torch import nn

    from loraforge.config import RunConfig

# Order matters: the first matching kind wins.
_KINDS: tuple[tuple[str, str], ...] = (
    ("lora", r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\b"),
    ("prompt", r"(prompt_encoder|prefix_encoder|virtual_tokens|\.embedding\.weight$)"),
    ("saved_module", r"modules_to_save"),
    ("embeddings", r"(embed_tokens|wte|wpe|word_embeddings|embed_positions|shared|embeddings)\."),
    ("lm_head", r"(lm_head|embed_out|output_layer)\."),
    ("head", r"(score|classifier|qa_outputs|pooler)\."),
    ("norm", r"(norm|ln_|layernorm|LayerNorm)"),
    ("bias", r"\.bias$"),
    ("attention", r"(attn|attention|self_attn|query|key|value|q_proj|k_proj|v_proj|o_proj|W_pack|c_attn)"),
    ("mlp", r"(mlp|ffn|fc|dense_h_to_4h|dense_4h_to_h|gate|up_proj|down_proj|wi|wo|intermediate|output\.dense)"),
)


@dataclass
class TrainableReport:
    trainable: int
    total: int
    by_kind: dict[str, tuple[int, int]] = field(default_factory=dict)  # kind → (trainable, total)
    trainable_names: list[str] = field(default_factory=list)

    @property
    def trained_kinds(self) -> dict[str, int]:
        """kind → trainable parameters, for the kinds with any."""
        return {k: t for k, (t, _) in self.by_kind.items() if t}

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def line(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"

    def table(self) -> str:
        rows = [f"  {k:<13} {t:>13,} / {n:>13,}" for k, (t, n) in sorted(self.by_kind.items()) if n]
        return "\n".join(["  kind          trainable     /         total", *rows])


def param_kind(name: str) -> str:
    for kind, pattern in _KINDS:
        if re.search(pattern, name):
            return kind
    return "other"


def trainable_report(model: nn.Module) -> TrainableReport:
    """Count parameters by `requires_grad` (each shared/tied tensor once), broken down by module kind."""
    seen: set[int] = set()
    report = TrainableReport(0, 0)
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = _numel(p)
        kind = param_kind(name)
        t, total = report.by_kind.get(kind, (0, 0))
        report.total += n
        if p.requires_grad:
            report.trainable += n
            report.trainable_names.append(name)
            t += n
        report.by_kind[kind] = (t, total + n)
    return report


def _numel(p) -> int:
    # bitsandbytes 4-bit weights pack two values per byte; count the logical parameters.
    shape = getattr(p, "quant_state", None)
    if shape is not None and getattr(shape, "shape", None) is not None:
        import math

        return math.prod(shape.shape)
    return p.numel()


def nothing_trainable(report: TrainableReport, cfg: RunConfig) -> list[Problem]:
    """The rule every method shares: something must train. (Each method's own rules are its record's `verify`;
    `loraforge.methods.verify_trainable` runs both.)"""
    if report.trainable:
        return []
    return [Problem("method", "nothing is trainable in the built model", value=cfg.method,
                    fix="check target_modules / freeze settings; see `loraforge inspect`")]
