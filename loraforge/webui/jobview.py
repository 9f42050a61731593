"""What the Evaluate & export page shows of a job: its progress read from the child's own output (the exporters'
tqdm bar while tensors are written; eval's one line per finished variant), and an eval report as a table of
metrics with the deltas over the base (from `eval_report.json`, which `loraforge eval` writes)."""

from __future__ import annotations

import json
import re
from pathlib import Path

_TQDM = re.compile(r"(?:^|\n)([^\n:%|]*?):?\s*(\d{1,3})%\|")
_VARIANTS = re.compile(r"^\d+ examples, variants: (.+)$", re.M)


def progress(kind: str, log: str) -> dict | None:
    """{"percent", "label"} of a running eval/export job, from its log; None when it says nothing yet."""
    if kind == "eval":
        m = _VARIANTS.search(log)
        if m is None:
            return {"percent": 0, "label": "loading the model"} if log.count("\n") > 1 else None
        names = [n.strip() for n in m.group(1).split(",")]
        done = [n for n in names if re.search(rf"^{re.escape(n)}: ", log[m.end():], re.M)]
        current = next((n for n in names if n not in done), None)
        return {"percent": round(100 * len(done) / len(names)),
                "label": f"{len(done)}/{len(names)} variants" + (f" · evaluating {current}" if current else "")}
    bars = list(_TQDM.finditer(log))
    if not bars:
        return None
    label, percent = bars[-1].group(1).strip(), int(bars[-1].group(2))
    return {"percent": percent, "label": label or "writing"}


def eval_summary(report_dir: Path, examples: int = 5) -> dict | None:
    """The metric table (value per variant, delta per adapter, best, direction) and the first examples."""
    path = report_dir / "eval_report.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    from loraforge.evaluate.report import _LABELS, LOWER_IS_BETTER

    variants = list(data["variants"])
    rows = []
    for metric, best in data["best"].items():
        values = {}
        for name, v in data["variants"].items():
            values[name] = v.get(metric) if metric in ("loss", "perplexity") else v["metrics"].get(metric)
        rows.append({"metric": metric, "label": _LABELS.get(metric, metric), "values": values, "best": best,
                     "deltas": {a: data["deltas"][a].get(metric) for a in variants[1:]},
                     "lower_is_better": metric in LOWER_IS_BETTER})
    return {"variants": variants, "n_examples": data["n_examples"], "data": data["data"], "metrics": rows,
            "examples": [{"prompt": ex["prompt"], "references": ex["references"], "outputs": ex["outputs"]}
                         for ex in data["examples"][:examples]]}
