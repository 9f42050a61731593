"""Before/after evaluation: does the adapter beat the base model on held-out data?

For each variant — the base model (adapters disabled) and every named adapter — `evaluate` measures

1. **loss / perplexity** on the reference answers, teacher-forced: the prompt is rendered exactly as in training
   (`loraforge.data.templates.encode_conversation`) and only the tokens of the final answer count, so the number
   is comparable with the training run's `val_loss`;
2. **generation metrics** on greedy (or sampled) answers: exact match, contains-match, BLEU and ROUGE-L
   (`loraforge.metrics`, CJK-aware).

The report keeps every generation next to its prompt and references, and the delta of each adapter over the base
(`EvalReport.deltas`), so two adapters can also be compared side by side (A/B).

Prompts are rendered with the template and system prompt each variant was trained with (read from the run's
`config.yaml` by `InferenceModel`), exactly as `loraforge chat` and `serve` render them, so the evaluation
measures what users will get. `EvalOptions.template` / `system_prompt` override that for every variant.

The pieces, one job each: `options` (EvalOptions), `examples` (test rows → EvalExample), `loss` (teacher-forced
answer loss), `runner` (`evaluate`: every variant in turn), `report` (EvalReport and its JSON / Markdown /
terminal forms); the generation metrics are `loraforge.metrics` (training uses them too). Everything is
importable from `loraforge.evaluate`.
"""

from __future__ import annotations

from loraforge.evaluate.examples import REFERENCE_KEYS, EvalExample, load_eval_examples
from loraforge.evaluate.loss import IGNORE_INDEX, answer_losses
from loraforge.evaluate.options import EvalOptions
from loraforge.evaluate.report import (LOWER_IS_BETTER, EvalReport, VariantResult, format_markdown, format_summary,
                                       write_report)
from loraforge.evaluate.runner import evaluate
from loraforge.inference.settings import BASE

__all__ = [
    "BASE", "IGNORE_INDEX", "LOWER_IS_BETTER", "REFERENCE_KEYS", "EvalExample", "EvalOptions", "EvalReport",
    "VariantResult", "answer_losses", "evaluate", "format_markdown", "format_summary", "load_eval_examples",
    "write_report",
]
