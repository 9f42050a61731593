"""DPO teaches the real model a preference (issue 17): SmolLM2 + LoRA, 16 DPO steps (with the RPO SFT term,
`dpo_sft_weight: 1`) on the shipped careful vs. overconfident medical pairs, then the 20 held-out pairs (unseen
questions): the base model prefers the chosen reply on at most half of them, the tuned one on at least 90%; and
greedy answers to unseen questions open as the chosen replies do ("I can't …"), which the base's never do. Pair
accuracy = the chosen reply's summed log-prob beats the rejected one's (`loraforge.evaluate.pairs`). The longer run, with greedy answers, is benchmarks/dpo_learns.py
(numbers in BENCHMARKS.md)."""

import json
from pathlib import Path

import pytest

from loraforge.config import config_from_dict
from loraforge.evaluate.pairs import pair_accuracy, pair_margins, style_rate
from loraforge.inference import InferenceModel
from loraforge.train.loop import train

DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "preference"


def test_shipped_pairs_are_balanced_and_the_heldout_questions_unseen():
    rows = {name: [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines() if line.strip()]
            for name in ("train", "heldout")}
    assert (len(rows["train"]), len(rows["heldout"])) == (80, 20)
    assert not {r["instruction"] for r in rows["train"]} & {r["instruction"] for r in rows["heldout"]}
    assert all(r["chosen"].startswith("I can't examine you") for rs in rows.values() for r in rs)


@pytest.mark.slow
def test_dpo_makes_heldout_pairs_prefer_the_careful_reply(smollm2_dir, tmp_path):
    from loraforge.data.checks import DataStats
    from loraforge.data.preference import encode_rows, load_preference_rows

    out = tmp_path / "dpo"
    cfg = config_from_dict(dict(base_model=str(smollm2_dir), stage="dpo", metadata_path=str(DATA / "train.jsonl"),
                                output_dir=str(out), max_steps=16, batch_size=4, learning_rate=5e-4, pref_beta=0.1,
                                warmup_ratio=0.0,
                                dpo_sft_weight=1.0,
                                logging_steps=5, save_steps=None, report_to=["none"], plot_loss=False,
                                tokenized_cache=False))
    train(cfg, echo=lambda _m: None)
    model = InferenceModel.load(str(smollm2_dir), {"dpo": str(out)}, dtype="float32")
    pairs, _ = encode_rows(model.tokenizer, load_preference_rows([DATA / "heldout.jsonl"], cfg), cfg, DataStats())
    assert len(pairs) == 20
    base = pair_margins(model, pairs, "base")
    tuned = pair_margins(model, pairs, "dpo")
    print(f"held-out pair accuracy: base {pair_accuracy(base):.2f}, DPO {pair_accuracy(tuned):.2f}")
    assert pair_accuracy(base) <= 0.5
    assert pair_accuracy(tuned) >= 0.9, tuned
    assert sum(tuned) / len(tuned) > sum(base) / len(base) + 10  # nats: the margins moved, not just their signs
    prompts = [[{"role": "user", "content": json.loads(line)["instruction"]}]
               for line in (DATA / "heldout.jsonl").read_text().splitlines()[:10]]
    openers = {v: style_rate(model, prompts, [], v, max_new_tokens=6)[1] for v in ("base", "dpo")}
    opens = {v: sum(a.strip().lower().startswith("i can't") for a in answers) / len(answers)
             for v, answers in openers.items()}
    print(f"greedy answers opening like the chosen replies: base {opens['base']:.1f}, DPO {opens['dpo']:.1f}")
    assert opens["base"] == 0 and opens["dpo"] >= 0.7, openers
