"""`EvalOptions`: how an evaluation decodes, scores and renders prompts, validated before any model loads."""

from __future__ import annotations

from dataclasses import dataclass

from loraforge.errors import ConfigError, Problem
from loraforge.metrics import METRICS, check_metrics, check_tokenize


@dataclass
class EvalOptions:
    """How to evaluate.

    Attributes:
        max_new_tokens: generation budget per answer.
        temperature: 0 = greedy decoding (reproducible); > 0 samples with `seed`.
        batch_size: examples per forward / generate call.
        tokenize: tokenization for BLEU / ROUGE-L: auto (CJK characters, other words), char, word, jieba.
        metrics: generation metrics to compute (any of exact_match, contains, bleu, rouge_l); empty = loss only.
        cutoff_len: longest prompt + answer, in tokens, for the loss (as in training).
        template: `auto` = each variant's own training template; any other name forces it for every variant.
        system_prompt: system message for rows without one (default: each variant's training system prompt).
        limit: only the first N examples.
        seed: sampling seed when temperature > 0.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    batch_size: int = 8
    tokenize: str = "auto"
    metrics: tuple[str, ...] = METRICS
    cutoff_len: int = 1024
    template: str = "auto"
    system_prompt: str | None = None
    limit: int | None = None
    seed: int = 0

    def validate(self) -> None:
        """Raises:
            ConfigError: every out-of-range value or unknown name, together.
        """
        problems: list[Problem] = []
        for key, low in (("max_new_tokens", 1), ("batch_size", 1), ("cutoff_len", 2)):
            value = getattr(self, key)
            if not isinstance(value, int) or value < low:
                problems.append(Problem(key, f"must be an integer >= {low}", value=value, allowed=f">= {low}"))
        if self.temperature < 0:
            problems.append(Problem("temperature", "must not be negative", value=self.temperature,
                                    allowed=">= 0 (0 = greedy)"))
        if self.limit is not None and self.limit < 1:
            problems.append(Problem("limit", "must be at least 1", value=self.limit, fix="leave it out to use every example"))
        from loraforge.data.templates import TEMPLATES

        if self.template not in TEMPLATES:
            problems.append(Problem("template", "unknown template", value=self.template, allowed=", ".join(TEMPLATES),
                                    fix="leave it at `auto` to use each variant's training template"))
        for check in (lambda: check_tokenize(self.tokenize), lambda: check_metrics(self.metrics)):
            try:
                check()
            except ConfigError as err:
                problems.extend(err.problems)
        if problems:
            raise ConfigError(problems, title="invalid evaluation options")
