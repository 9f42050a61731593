"""The evaluation report: per-variant scores, deltas over the base, and its JSON / Markdown / terminal forms."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraforge.evaluate.examples import EvalExample
from loraforge.evaluate.options import EvalOptions
from loraforge.inference.settings import BASE

# Lower is better for these; every generation metric is higher-is-better.
LOWER_IS_BETTER = ("loss", "perplexity")


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


# ----------------------------------------------------------------------------------------------- output


_LABELS = {"loss": "loss", "perplexity": "perplexity", "exact_match": "exact match %", "contains": "contains %",
           "bleu": "BLEU", "rouge_l": "ROUGE-L %"}


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def summary_line(v: VariantResult) -> str:
    """One variant's scores on one line (the progress line `evaluate` prints per variant)."""
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
