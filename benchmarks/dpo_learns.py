"""DPO visibly teaches the real model a preference: SmolLM2-135M + LoRA on `examples/data/preference/`.

Before and after a short DPO run (loraforge defaults: LoRA on every linear layer, the reference = the base with
the adapter disabled), on the 20 held-out pairs and their unseen prompts:

* pair accuracy: the share of held-out pairs whose chosen reply has the higher summed log-prob
  (`loraforge.evaluate.pairs`; no reference needed, so the base model has one too);
* style: the share of greedy answers to the held-out prompts that use the chosen style's phrasing
  ("I can't examine you, …"), that open as every chosen reply does ("I can't …"), and that use the rejected
  style's ("Don't worry, I'm sure: …").

    python benchmarks/dpo_learns.py                     # the run in BENCHMARKS.md
    python benchmarks/dpo_learns.py --steps 8 --heldout 8 --no-generate   # the suite's variant, roughly
    python benchmarks/dpo_learns.py --sft-weight 1.0    # DPO + an SFT term on the chosen side (RPO)

`tests/test_learning_preference.py` runs a shorter variant in the suite.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "preference"
CAREFUL = ("examine you",)  # every chosen reply opens with "I can't examine you, …"
CAREFUL_OPENER = ("i can't", "i cannot")  # every chosen reply starts "I can't …"; no rejected one does
DISMISSIVE = ("don't worry", "no worries", "relax,", "i'm sure", "completely sure", "no need to see a doctor",
              "skip the doctor", "don't need a doctor")  # the rejected replies' openers and closers


def dpo_config(output_dir: str, steps: int, lr: float, beta: float, batch_size: int, **keys: Any):
    from loraforge.config import config_from_dict

    return config_from_dict({"base_model": "smollm2", "stage": "dpo", "metadata_path": str(DATA / "train.jsonl"),
                             "output_dir": output_dir, "max_steps": steps, "learning_rate": lr, "pref_beta": beta,
                             "batch_size": batch_size, "logging_steps": max(1, steps // 4), "save_steps": None,
                             "warmup_ratio": 0.0, "tokenized_cache": False, **keys})


def heldout_pairs(cfg: Any, tokenizer: Any, n: int | None = None) -> list:
    """The held-out pairs, encoded by the training encoder with the run's settings."""
    from loraforge.data.preference import encode_rows, load_preference_rows
    from loraforge.data.checks import DataStats

    rows = load_preference_rows([DATA / "heldout.jsonl"], cfg)[:n]
    examples, _ = encode_rows(tokenizer, rows, cfg, DataStats())
    return examples


def measure(base: str, run_dir: str, cfg: Any, heldout: int | None, generate: bool) -> dict[str, Any]:
    from loraforge.evaluate.pairs import pair_accuracy, pair_margins, style_rate
    from loraforge.inference import InferenceModel

    model = InferenceModel.load(base, {"dpo": run_dir}, dtype="float32")
    pairs = heldout_pairs(cfg, model.tokenizer, heldout)
    prompts = [[{"role": "user", "content": json.loads(line)["instruction"]}]
               for line in (DATA / "heldout.jsonl").read_text().splitlines()[:heldout]]
    out: dict[str, Any] = {"pairs": len(pairs)}
    for variant in ("base", "dpo"):
        margins = pair_margins(model, pairs, variant)
        out[variant] = {"pair_accuracy": pair_accuracy(margins), "mean_margin": sum(margins) / len(margins)}
        if generate:
            careful, answers = style_rate(model, prompts, CAREFUL, variant, max_new_tokens=32)
            out[variant].update(careful_style=careful, answers=answers,
                                careful_opener=sum(a.strip().lower().startswith(CAREFUL_OPENER) for a in answers)
                                / len(answers),
                                dismissive_style=sum(any(m in a.lower() for m in DISMISSIVE) for a in answers)
                                / len(answers))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sft-weight", type=float, default=0.0, help="dpo_sft_weight (RPO's α); 0 = plain DPO")
    parser.add_argument("--heldout", type=int, default=None, help="score only the first N held-out pairs")
    parser.add_argument("--no-generate", action="store_true", help="skip the greedy answers")
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args()

    from loraforge.models.gguf import resolve_model_path
    from loraforge.train.loop import train

    base = str(resolve_model_path("smollm2"))
    out = args.output_dir or tempfile.mkdtemp(prefix="dpo-learns-")
    cfg = dpo_config(out, args.steps, args.lr, args.beta, args.batch_size, dpo_sft_weight=args.sft_weight)
    t0 = time.time()
    result = train(cfg, echo=lambda _m: None)
    train_s = time.time() - t0
    report = measure(base, out, cfg, args.heldout, not args.no_generate)
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    print(f"DPO: {args.steps} steps × {args.batch_size} pairs, lr {args.lr}, beta {args.beta}, "
          f"sft weight {args.sft_weight}: {train_s:.0f} s "
          f"train, final loss {result.final_loss:.4f}; run dir {out}")
    for r in logged:
        print(f"  step {r['step']:>3}: loss {r['loss']:.4f}  margins {r['rewards/margins']:+.3f}  "
              f"accuracies {r['rewards/accuracies']:.2f}")
    print(f"held-out pairs: {report['pairs']}")
    for variant in ("base", "dpo"):
        v = report[variant]
        line = f"  {variant:>4}: pair accuracy {v['pair_accuracy']:.2f}, mean margin {v['mean_margin']:+.2f} nats"
        if "careful_style" in v:
            line += (f", careful style {v['careful_style']:.2f}, opens like the chosen replies "
                     f"{v['careful_opener']:.2f}, dismissive style {v['dismissive_style']:.2f}")
        print(line)
    if not args.no_generate:
        for i in range(3):
            print(f"\nQ: {json.loads((DATA / 'heldout.jsonl').read_text().splitlines()[i])['instruction']}")
            print(f"  base: {report['base']['answers'][i]!r}\n  dpo:  {report['dpo']['answers'][i]!r}")


if __name__ == "__main__":
    main()
