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


def verify_trainable(report: TrainableReport, cfg: RunConfig) -> list[Problem]:
    """Problems when the built model does not train what the config asked for."""
    problems: list[Problem] = []
    kinds = {k: t for k, (t, _) in report.by_kind.items() if t}
    if report.trainable == 0:
        problems.append(Problem("method", "nothing is trainable in the built model", value=cfg.method,
                                fix="check target_modules / freeze settings; see `loraforge inspect`"))
        return problems
    if cfg.method in ("lora", "qlora"):
        if "lora" not in kinds:
            problems.append(Problem("target_modules", "no LoRA weights were created", value=cfg.target_modules,
                                    fix="use names from `loraforge inspect MODEL`"))
        elif isinstance(cfg.target_modules, list):
            # PEFT silently drops list entries that match nothing when another entry matches (FINDINGS trap 3).
            for i, entry in enumerate(cfg.target_modules):
                if not any(f"{entry}.lora_" in n for n in report.trainable_names):
                    problems.append(Problem(f"target_modules[{i}]", "no LoRA weights were created for this entry",
                                            value=entry, fix="use names from `loraforge inspect MODEL`"))
        allowed = {"lora", "saved_module"} | ({"bias"} if cfg.lora_bias != "none" else set())
        if cfg.lora_bias != "none":
            allowed |= {"attention", "mlp", "norm", "other", "embeddings", "lm_head", "head"}
        stray = sorted(set(kinds) - allowed)
        if stray:
            problems.append(Problem("method", f"base weights are trainable in a LoRA run: {', '.join(stray)}",
                                    value=cfg.method, fix="this is a bug in the method setup; please report it"))
    elif cfg.method in ("prefix", "ptuning", "prompt"):
        stray = sorted(set(kinds) - {"prompt", "saved_module"})
        if stray:
            problems.append(Problem("method", f"base weights are trainable in a {cfg.method} run: {', '.join(stray)}",
                                    value=cfg.method))
    elif cfg.method == "freeze":
        problems += _verify_freeze(report, cfg, kinds)
    elif cfg.method == "full" and report.trainable != report.total:
        problems.append(Problem("method", f"full fine-tuning but only {report.percent:.1f}% of parameters are trainable",
                                value=cfg.method))
    return problems


def _verify_freeze(report: TrainableReport, cfg: RunConfig, kinds: dict[str, int]) -> list[Problem]:
    """Freeze runs: something is frozen, every requested block trains, and embeddings / LM head train only when
    asked for (a tied LM head is the embeddings' tensor, so asking for either allows both)."""
    problems: list[Problem] = []
    if report.trainable == report.total:
        problems.append(Problem("freeze_trainable_layers", "every parameter is trainable: nothing was frozen",
                                value=cfg.freeze_trainable_layers, fix="check the freeze settings"))
    for i in cfg.freeze_layer_indices or []:
        if i >= 0 and not any(f".{i}." in n for n in report.trainable_names):
            problems.append(Problem("freeze_layer_indices", f"block {i} was asked for but none of its "
                                    "parameters is trainable", value=i, fix="check the block indices with "
                                    "`loraforge inspect MODEL`"))
    if not cfg.freeze_trainable_modules:  # regexes may legitimately select embeddings or the head
        asked = cfg.freeze_train_embeddings or cfg.freeze_train_lm_head
        if "embeddings" in kinds and not asked:
            problems.append(Problem("freeze_train_embeddings", "the input embeddings are trainable but were not "
                                    "asked for", value=False, fix="this is a bug in the method setup; please report it"))
        if "lm_head" in kinds and not asked:
            problems.append(Problem("freeze_train_lm_head", "the LM head is trainable but was not asked for",
                                    value=False, fix="this is a bug in the method setup; please report it"))
    return problems
