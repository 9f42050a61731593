"""`evaluate`: load the model once, then score every variant (base, then each adapter) in turn."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Sequence

from loraforge.errors import ConfigError, DataError, Problem
from loraforge.evaluate.examples import EvalExample, load_eval_examples
from loraforge.evaluate.loss import answer_losses
from loraforge.evaluate.options import EvalOptions
from loraforge.evaluate.report import EvalReport, VariantResult, summary_line
from loraforge.inference import BASE, GenerationSettings, InferenceModel
from loraforge.metrics import example_scores, score_generations


def evaluate(base: str | Path, adapters: dict[str, str | Path] | None, data_path: str | Path,
             options: EvalOptions | None = None, *, progress: Callable[[str], None] | None = None,
             model: "InferenceModel | None" = None) -> EvalReport:
    """Score the base model and every adapter on the examples in `data_path`.

    Args:
        base: base model (built-in name such as `smollm2`, HF dir or .gguf).
        adapters: public name → adapter dir (a run's output_dir or checkpoint); `base` is reserved.
        data_path: test file in a training format, optionally with `reference` lists.
        options: see `EvalOptions`.
        progress: called with one line per finished step (the CLI prints them).
        model: an already loaded `InferenceModel` (a server's, say): its adapters are the variants, `adapters`
            is only checked, and `base` only labels the report. Saves a reload.

    Raises:
        ConfigError: invalid options. DataError: bad test rows. ModelError: bad base or adapter.
    """
    options = options or EvalOptions()
    options.validate()
    say = progress or (lambda line: None)
    examples = load_eval_examples(data_path, options.system_prompt)
    if options.limit is not None:
        examples = examples[: options.limit]
    adapters = {name: str(path) for name, path in (adapters or {}).items()}
    if BASE in adapters:
        raise ConfigError([Problem("adapters", "`base` is reserved for the model without adapters", value=BASE,
                                   fix="give the adapter another name")])
    if model is None:
        say(f"loading {base}" + (f" with adapters {', '.join(adapters)}" if adapters else ""))
        model = InferenceModel.load(base, adapters)
    say(f"{len(examples)} examples, variants: {', '.join(model.adapter_names)}")
    with model.forced_template(options.template):
        variants, truncated = _evaluate_variants(model, examples, options, say)
    return EvalReport(base=str(base), data_path=str(data_path), options=options, examples=examples,
                      variants=variants, truncated=truncated)


def _evaluate_variants(model: InferenceModel, examples: list[EvalExample], options: EvalOptions,
                       say: Callable[[str], None]) -> tuple[dict[str, VariantResult], int]:
    """Loss, then generations and their scores, for every variant in turn: (results by name, truncated count)."""
    variants: dict[str, VariantResult] = {}
    truncated = 0
    for name in model.adapter_names:
        start = time.perf_counter()
        losses, n_tokens, n_truncated = answer_losses(model, name, examples, options)
        truncated = max(truncated, n_truncated)
        if n_tokens == 0:
            raise DataError([Problem("cutoff_len", "no answer token is left in any example after truncation",
                                     value=options.cutoff_len, fix="raise cutoff_len (use the training run's value)")])
        total_nll = sum(total for total, _ in losses if total is not None)
        loss = total_nll / max(n_tokens, 1)
        outputs = _generate(model, name, examples, options) if options.metrics else [""] * len(examples)
        refs = [ex.references for ex in examples]
        metrics = score_generations(outputs, refs, options.metrics, options.tokenize) if options.metrics else {}
        variants[name] = VariantResult(
            name=name, adapter_path=None if name == BASE else str(model.adapter_info(name).path), loss=loss,
            perplexity=math.exp(min(loss, 50.0)),
            answer_tokens=n_tokens, metrics=metrics, outputs=outputs,
            example_losses=[None if total is None else total / count for total, count in losses],
            example_scores=[example_scores(o, r, options.metrics, options.tokenize) for o, r in zip(outputs, refs)],
            seconds=time.perf_counter() - start)
        say(f"{name}: " + summary_line(variants[name]))
    return variants, truncated


def _generate(model: InferenceModel, name: str, examples: Sequence[EvalExample], options: EvalOptions) -> list[str]:
    """The variant's answer to every example (left-padded batches through InferenceModel)."""
    settings = GenerationSettings(max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                                  seed=options.seed if options.temperature > 0 else None)
    outputs: list[str] = []
    for b in range(0, len(examples), options.batch_size):
        batch = [ex.messages for ex in examples[b: b + options.batch_size]]
        outputs += [r.text.strip() for r in model.generate_batch(batch, name, settings)]
    return outputs
