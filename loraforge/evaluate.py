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
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from loraforge.errors import ConfigError, DataError, Problem
from loraforge.metrics import METRICS, check_metrics, check_tokenize, example_scores, score_generations

if TYPE_CHECKING:  # pragma: no cover
    from loraforge.inference import InferenceModel

BASE = "base"  # the variant name of the model without adapter (same as loraforge.inference.BASE)
REFERENCE_KEYS = ("reference", "expect")
IGNORE_INDEX = -100
_NO_CUTOFF = 1 << 30
# Lower is better for these; every generation metric is higher-is-better.
LOWER_IS_BETTER = ("loss", "perplexity")


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


# ----------------------------------------------------------------------------------------------- data


@dataclass
class EvalExample:
    """One test question.

    Attributes:
        source: ``file:line`` of the row.
        messages: the conversation up to the answer (optional system, then user/assistant turns, ending with user).
        references: acceptable answers (generation metrics take the best match over them).
        answer: the answer scored by the loss: the row's own answer (`output` / last assistant turn), else the
            first reference.
    """

    source: str
    messages: list[dict[str, str]]
    references: list[str]
    answer: str

    @property
    def prompt(self) -> str:
        """The last user message (what the report shows as the question)."""
        return self.messages[-1]["content"]


def _parse_references(data: dict, where: str) -> tuple[list[str] | None, list[Problem]]:
    """The row's `reference` (or `expect`) as a list of strings, or None when it has neither."""
    present = [k for k in REFERENCE_KEYS if k in data]
    if not present:
        return None, []
    if len(present) > 1:
        return None, [Problem(where, "both `reference` and `expect` given", value=present,
                              fix="keep one of them (they mean the same: the acceptable answers)")]
    key = present[0]
    value = data[key]
    refs = [value] if isinstance(value, str) else value
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        return None, [Problem(where, f"`{key}` must be a string or a list of strings",
                              value=json.dumps(value, ensure_ascii=False)[:80],
                              allowed='"answer" or ["answer", "another acceptable answer"]')]
    if not refs or not all(r.strip() for r in refs):
        return None, [Problem(where, f"`{key}` has an empty answer", value=value,
                              fix="every acceptable answer must be non-empty text")]
    return refs, []


def _with_answer(data: dict, answer: str) -> dict:
    """A copy of a row that has no answer turn yet, completed with `answer` so the training-format parser
    (which requires one) accepts it. Malformed rows are returned unchanged for the parser to report."""
    data = dict(data)
    if "messages" in data and isinstance(data["messages"], list) and data["messages"]:
        last = data["messages"][-1]
        if isinstance(last, dict) and last.get("role") != "assistant":
            data["messages"] = data["messages"] + [{"role": "assistant", "content": answer}]
    elif "conversations" in data and isinstance(data["conversations"], list) and data["conversations"]:
        last = data["conversations"][-1]
        if isinstance(last, dict) and last.get("from") not in ("gpt", "assistant"):
            data["conversations"] = data["conversations"] + [{"from": "gpt", "value": answer}]
    elif "output" not in data:
        data["output"] = answer
    return data


def load_eval_examples(path: str | Path, system_prompt: str | None = None) -> list[EvalExample]:
    """Test examples in the training formats (alpaca instruction/output, chat messages, sharegpt).

    The reference is the row's answer (`output` / the last assistant turn). A row may instead (or also) give
    `reference` — a string or a list of acceptable answers (`expect` is accepted as a synonym); then the row
    may end with the user's turn.

    Raises:
        DataError: every bad row named by ``file:line``, or an empty file.
    """
    from loraforge.data.formats import Row, read_rows, row_to_messages

    problems: list[Problem] = []
    examples: list[EvalExample] = []
    for row in read_rows(path):
        refs, ref_problems = _parse_references(row.data, row.source)
        if ref_problems:
            problems.extend(ref_problems)
            continue
        data = {k: v for k, v in row.data.items() if k not in REFERENCE_KEYS}
        if refs is not None:
            data = _with_answer(data, refs[0])
        try:
            messages = row_to_messages(Row(row.source, data), system_prompt)
        except DataError as err:
            problems.extend(err.problems)
            continue
        answer = messages[-1]["content"]
        examples.append(EvalExample(source=row.source, messages=messages[:-1], references=refs or [answer],
                                    answer=answer))
    if problems:
        raise DataError(problems)
    if not examples:
        raise DataError([Problem(str(path), "no test examples found",
                                 fix='add rows like {"instruction": ..., "output": ...} or '
                                     '{"instruction": ..., "reference": [...]} (one JSON object per line)')])
    return examples


# ----------------------------------------------------------------------------------------------- report


@dataclass
class VariantResult:
    """The scores of one variant (the base model or one adapter).

    Attributes:
        loss: mean negative log-likelihood per answer token (nats), over all examples' answer tokens.
        perplexity: exp(loss).
        answer_tokens: how many tokens the loss averaged over.
        metrics: generation metrics, each a percentage (0..100).
        outputs: the generated answer of every example, in example order.
        example_losses: mean answer-token loss of every example (None where truncation left no answer token).
        example_scores: per-example exact_match / contains / rouge_l (0..100).
        seconds: wall time spent on this variant.
    """

    name: str
    adapter_path: str | None
    loss: float
    perplexity: float
    answer_tokens: int
    metrics: dict[str, float]
    outputs: list[str]
    example_losses: list[float | None]
    example_scores: list[dict[str, float]]
    seconds: float

    def value(self, metric: str) -> float:
        """`loss`, `perplexity` or a generation metric."""
        if metric in LOWER_IS_BETTER:
            return getattr(self, metric)
        return self.metrics[metric]


@dataclass
class EvalReport:
    """Everything `evaluate` measured. `variants` holds `base` first, then the adapters in the order given."""

    base: str
    data_path: str
    options: EvalOptions
    examples: list[EvalExample]
    variants: dict[str, VariantResult]
    truncated: int = 0  # examples whose prompt + answer exceeded cutoff_len (their loss uses what fits)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    @property
    def metric_names(self) -> list[str]:
        """`loss`, `perplexity`, then the generation metrics."""
        return list(LOWER_IS_BETTER) + list(self.options.metrics)

    def delta(self, name: str, against: str = BASE) -> dict[str, float]:
        """`name` minus `against`, per metric — e.g. `report.delta("v2", against="v1")` for an A/B comparison.

        Raises:
            KeyError: a variant that was not evaluated.
        """
        a, b = self.variants[name], self.variants[against]
        return {m: a.value(m) - b.value(m) for m in self.metric_names}

    @property
    def deltas(self) -> dict[str, dict[str, float]]:
        """For each adapter: adapter minus base, per metric (negative loss delta = better)."""
        return {name: self.delta(name) for name in self.variants if name != BASE}

    def best(self, metric: str) -> str:
        """The variant with the best value of `metric` (lowest loss / perplexity, highest otherwise)."""
        pick = min if metric in LOWER_IS_BETTER else max
        return pick(self.variants, key=lambda n: self.variants[n].value(metric))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the content of eval_report.json)."""
        return {
            "created": self.created,
            "base": self.base,
            "data": self.data_path,
            "n_examples": len(self.examples),
            "truncated": self.truncated,
            "options": {**dataclasses.asdict(self.options), "metrics": list(self.options.metrics)},
            "variants": {name: {"adapter_path": v.adapter_path, "loss": v.loss, "perplexity": v.perplexity,
                                "answer_tokens": v.answer_tokens, "metrics": v.metrics, "seconds": round(v.seconds, 2)}
                         for name, v in self.variants.items()},
            "deltas": self.deltas,
            "best": {m: self.best(m) for m in self.metric_names},
            "examples": [
                {"source": ex.source, "prompt": ex.prompt, "messages": ex.messages, "references": ex.references,
                 "outputs": {name: v.outputs[i] for name, v in self.variants.items()},
                 "loss": {name: v.example_losses[i] for name, v in self.variants.items()},
                 "scores": {name: v.example_scores[i] for name, v in self.variants.items()}}
                for i, ex in enumerate(self.examples)
            ],
        }


# ----------------------------------------------------------------------------------------------- evaluation


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
    from loraforge.inference import InferenceModel

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
    with _forced_template(model, options.template):
        variants, truncated = _evaluate_variants(model, examples, options, say)
    return EvalReport(base=str(base), data_path=str(data_path), options=options, examples=examples,
                      variants=variants, truncated=truncated)


def _evaluate_variants(model: "InferenceModel", examples: list[EvalExample], options: EvalOptions,
                       say: Callable[[str], None]) -> tuple[dict[str, VariantResult], int]:
    """Loss, then generations and their scores, for every variant in turn: (results by name, truncated count)."""
    variants: dict[str, VariantResult] = {}
    truncated = 0
    for name in model.adapter_names:
        start = time.perf_counter()
        losses, n_tokens, n_truncated = _answer_losses(model, name, examples, options)
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
            name=name, adapter_path=None if name == BASE else str(model.adapter_info(name).path), loss=loss, perplexity=math.exp(min(loss, 50.0)),
            answer_tokens=n_tokens, metrics=metrics, outputs=outputs,
            example_losses=[None if total is None else total / count for total, count in losses],
            example_scores=[example_scores(o, r, options.metrics, options.tokenize) for o, r in zip(outputs, refs)],
            seconds=time.perf_counter() - start)
        say(f"{name}: " + _summary_line(variants[name]))
    return variants, truncated


@contextmanager
def _forced_template(model: "InferenceModel", template: str) -> Iterator[None]:
    """Render every variant with `template` (unless it is `auto`) instead of the one recorded with its run,
    and restore the recorded ones afterwards (the caller may pass in a model it keeps using).

    InferenceModel keeps the template per adapter in its (frozen) AdapterInfo and has no public setter, so the
    infos are swapped here.
    """
    if template == "auto":
        yield
        return
    saved_base, saved = model.template, dict(model._adapters)  # noqa: SLF001 (see docstring)
    model.template = template
    for name in model.adapter_names[1:]:
        model._adapters[name] = dataclasses.replace(model.adapter_info(name), template=template)  # noqa: SLF001
    try:
        yield
    finally:
        model.template = saved_base
        model._adapters.update(saved)  # noqa: SLF001


def _variant_prompt_settings(model: "InferenceModel", name: str) -> tuple[str, str | None]:
    """(template, system prompt) that `InferenceModel` renders prompts of variant `name` with."""
    info = model.adapter_info(name) if name != BASE else None
    if info is None:
        return model.template, model.base_system_prompt
    return info.template, info.system_prompt


@contextmanager
def _forward_module(model: "InferenceModel", name: str) -> Iterator[Any]:
    """The module whose forward pass runs variant `name`, held under the model lock.

    Mirrors how `InferenceModel` routes generation: LoRA adapters share one PeftModel (select with set_adapter),
    prompt-learning adapters have their own wrapper with the LoRA layers disabled, `base` disables all adapters.
    """
    with model.lock:
        lora = model._lora  # noqa: SLF001 — InferenceModel exposes generation only, no forward pass
        info = model.adapter_info(name) if name != BASE else None
        disable_lora = lora.disable_adapter() if lora is not None else nullcontext()
        if info is None:
            with disable_lora:
                yield model.model
        elif info.prompt_learning:
            with disable_lora:
                yield model._prompt_models[info.internal_name]  # noqa: SLF001
        else:
            lora.set_adapter(info.internal_name)
            yield lora


def _encode_for_loss(model: "InferenceModel", name: str, ex: EvalExample,
                     options: EvalOptions) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated) of prompt + answer; labels keep only the final answer's tokens."""
    from loraforge.data.templates import encode_conversation

    template, system = _variant_prompt_settings(model, name)
    messages = [dict(m) for m in ex.messages]
    if system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})  # as InferenceModel does for generation
    messages.append({"role": "assistant", "content": ex.answer})
    # Encode in full first: the final answer's span must be found before truncation, or a cut-off answer
    # would leave an earlier reply's tokens looking like "the last labelled span".
    encoded, _ = encode_conversation(model.tokenizer, messages, template=template, cutoff_len=_NO_CUTOFF,
                                     train_on_prompt=False)
    ids, labels = list(encoded.input_ids), list(encoded.labels)
    # Earlier assistant turns (multi-turn context) are trained on in training, but here only the final answer
    # is tested: keep the last contiguous run of labelled tokens.
    end = max((i for i, t in enumerate(labels) if t != IGNORE_INDEX), default=-1)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    labels = [t if start <= i <= end else IGNORE_INDEX for i, t in enumerate(labels)]
    # Like training: keep the start, cut the end (the answer, or part of it, may be lost).
    truncated = len(ids) > options.cutoff_len
    return ids[: options.cutoff_len], labels[: options.cutoff_len], truncated


def _answer_losses(model: "InferenceModel", name: str, examples: Sequence[EvalExample],
                   options: EvalOptions) -> tuple[list[tuple[float | None, int]], int, int]:
    """Teacher-forced answer loss of every example: ([(summed NLL or None, answer tokens)], total tokens,
    number truncated)."""
    import torch
    import torch.nn.functional as F

    encoded = [_encode_for_loss(model, name, ex, options) for ex in examples]
    n_truncated = sum(1 for _, _, cut in encoded if cut)
    results: list[tuple[float | None, int]] = [(None, 0)] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(encoded[i][0]))  # similar lengths share a batch
    order = [i for i in order if any(t != IGNORE_INDEX for t in encoded[i][1])]
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    info = model.adapter_info(name) if name != BASE else None
    # Left padding puts every answer at the end of the batch, so the model only has to compute logits for the
    # last few positions (`logits_to_keep`): full logits are batch × length × vocabulary floats, gigabytes for
    # a 150k vocabulary at 1024 tokens. Prompt-learning adapters keep right padding, because their output
    # changes with left padding (FINDINGS trap 5), and compute full logits.
    accepts = _forward_parameters(model.model)
    left = not (info is not None and info.prompt_learning)
    with _forward_module(model, name) as module, torch.inference_mode():
        for b in range(0, len(order), options.batch_size):
            rows = order[b: b + options.batch_size]
            width = max(len(encoded[i][0]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                seq, lab, _ = encoded[i]
                at = slice(width - len(seq), width) if left else slice(0, len(seq))
                ids[r, at], labels[r, at], mask[r, at] = torch.tensor(seq), torch.tensor(lab), 1
            kwargs: dict[str, Any] = {}
            keep = width
            if left and "position_ids" in accepts:
                # positions count real tokens only, so absolute position embeddings see no padding
                kwargs["position_ids"] = (mask.cumsum(dim=1) - 1).clamp(min=0).to(model.device)
            if left and "logits_to_keep" in accepts:
                first_label = int((labels != IGNORE_INDEX).int().argmax(dim=1).min())
                keep = width - first_label + 1  # the logits at first_label - 1 predict the first answer token
                kwargs["logits_to_keep"] = keep
            out = module(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), use_cache=False,
                         **kwargs)
            # The logits cover the last `keep` positions (prompt tuning prepends virtual-token positions before
            # them). Logits at position t predict the token at t + 1.
            logits = out.logits[:, -keep:, :].float()
            targets = labels[:, width - keep + 1:].to(logits.device)
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                  ignore_index=IGNORE_INDEX, reduction="none").view(len(rows), keep - 1)
            counts = (targets != IGNORE_INDEX).sum(dim=1)
            for r, i in enumerate(rows):
                results[i] = (float(nll[r].sum()), int(counts[r]))
    total_tokens = sum(count for _, count in results)
    return results, total_tokens, n_truncated


def _forward_parameters(module: Any) -> set[str]:
    """Names the model's forward accepts explicitly (not all architectures take position_ids or
    logits_to_keep)."""
    import inspect

    return set(inspect.signature(module.forward).parameters)


def _generate(model: "InferenceModel", name: str, examples: Sequence[EvalExample], options: EvalOptions) -> list[str]:
    """The variant's answer to every example (left-padded batches through InferenceModel)."""
    from loraforge.inference import GenerationSettings

    settings = GenerationSettings(max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                                  seed=options.seed if options.temperature > 0 else None)
    outputs: list[str] = []
    for b in range(0, len(examples), options.batch_size):
        batch = [ex.messages for ex in examples[b: b + options.batch_size]]
        outputs += [r.text.strip() for r in model.generate_batch(batch, name, settings)]
    return outputs


# ----------------------------------------------------------------------------------------------- output


_LABELS = {"loss": "loss", "perplexity": "perplexity", "exact_match": "exact match %", "contains": "contains %",
           "bleu": "BLEU", "rouge_l": "ROUGE-L %"}


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _summary_line(v: VariantResult) -> str:
    parts = [f"loss {v.loss:.4f}", f"ppl {v.perplexity:.2f}"] + [f"{k} {x:.1f}" for k, x in v.metrics.items()]
    return ", ".join(parts) + f" ({v.seconds:.1f} s)"


def format_summary(report: EvalReport) -> str:
    """A plain-text table for the terminal: one row per metric, one column per variant, then each adapter's
    delta over the base."""
    names = list(report.variants)
    adapters = names[1:]
    header = ["metric"] + names + [f"Δ {a}" for a in adapters]
    rows = [header]
    for m in report.metric_names:
        row = [_LABELS.get(m, m)] + [_fmt(report.variants[n].value(m)) for n in names]
        row += [_fmt(report.deltas[a][m], signed=True) for a in adapters]
        rows.append(row)
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"\n{len(report.examples)} examples from {report.data_path}"
                 + (f"; {report.truncated} truncated to cutoff_len {report.options.cutoff_len}" if report.truncated else ""))
    return "\n".join(lines)


def _cell(text: str, limit: int = 400) -> str:
    """Text safe inside a Markdown table cell."""
    text = text if len(text) <= limit else text[:limit] + "…"
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or "∅"


def format_markdown(report: EvalReport) -> str:
    """The Markdown report: options, the side-by-side metric table with deltas, then every example."""
    names = list(report.variants)
    adapters = names[1:]
    o = report.options
    out = [
        "# loraforge evaluation report",
        "",
        f"- base model: `{report.base}`",
        *[f"- adapter `{n}`: `{report.variants[n].adapter_path}`" for n in adapters],
        f"- data: `{report.data_path}` ({len(report.examples)} examples"
        + (f", {report.truncated} truncated to {o.cutoff_len} tokens" if report.truncated else "") + ")",
        f"- decoding: {'greedy' if o.temperature == 0 else f'temperature {o.temperature}, seed {o.seed}'}, "
        f"max_new_tokens {o.max_new_tokens}; BLEU/ROUGE tokenization `{o.tokenize}`",
        f"- created: {report.created}",
        "",
        "## Metrics",
        "",
        "Loss and perplexity are per answer token (lower is better); the generation metrics are percentages "
        "(higher is better). Δ is adapter minus base; **bold** marks the best variant.",
        "",
        "| metric | " + " | ".join(f"`{n}`" for n in names) + "".join(f" | Δ `{a}`" for a in adapters) + " |",
        "|---|" + "---:|" * (len(names) + len(adapters)),
    ]
    for m in report.metric_names:
        best = report.best(m) if len(names) > 1 else None
        cells = [(f"**{_fmt(report.variants[n].value(m))}**" if n == best else _fmt(report.variants[n].value(m)))
                 for n in names]
        cells += [_fmt(report.deltas[a][m], signed=True) for a in adapters]
        out.append(f"| {_LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    out += ["", "## Examples", "",
            "| # | source | prompt | reference | " + " | ".join(f"`{n}`" for n in names) + " |",
            "|---|---|---|---|" + "---|" * len(names)]
    for i, ex in enumerate(report.examples):
        refs = " / ".join(ex.references)
        outputs = []
        for n in names:
            scores = report.variants[n].example_scores[i]
            mark = " ✓" if scores.get("exact_match") or scores.get("contains") else ""
            outputs.append(_cell(report.variants[n].outputs[i]) + mark)
        out.append(f"| {i + 1} | `{_cell(Path(ex.source).name)}` | {_cell(ex.prompt)} | {_cell(refs)} | "
                   + " | ".join(outputs) + " |")
    out += ["", "✓ = the output contains (or equals) a reference answer.", ""]
    return "\n".join(out)


def write_report(report: EvalReport, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `eval_report.json` and `eval_report.md` into `out_dir` (created if needed); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "eval_report.json", out / "eval_report.md"
    json_path.write_text(json.dumps(report.to_dict(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(format_markdown(report), encoding="utf-8")
    return json_path, md_path
