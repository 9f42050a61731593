"""Fine-tuning visibly teaches the real model (issue 2): after a short LoRA run on the persona data, SmolLM2
answers held-out, paraphrased identity questions with its new name; the base model never does."""

import json
from pathlib import Path

import pytest

from loraforge.config import config_from_dict
from loraforge.inference import GenerationSettings, InferenceModel
from loraforge.train.loop import train

DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "persona"


def _name_rate(model: InferenceModel, adapter: str, rows: list[dict]) -> tuple[float, list[str]]:
    settings = GenerationSettings(max_new_tokens=24, temperature=0.0)
    answers = [r.text for r in model.generate_batch([r["messages"] for r in rows], adapter=adapter, settings=settings)]
    hits = sum(r["expect"].lower() in a.lower() for r, a in zip(rows, answers))
    return hits / len(rows), answers


@pytest.mark.slow
def test_persona_is_learned_and_generalizes(smollm2_dir, tmp_path):
    out = tmp_path / "persona"
    cfg = config_from_dict(dict(
        base_model=str(smollm2_dir), metadata_path=str(DATA / "train.jsonl"), method="lora", lora_rank=16,
        lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", batch_size=8, epochs=6, learning_rate=1e-3,
        warmup_steps=2, cutoff_len=128, logging_steps=5, save_steps=None, output_dir=str(out), report_to=["none"],
        plot_loss=False, seed=0))
    result = train(cfg, echo=lambda _m: None)
    assert result.final_loss is not None and result.final_loss < 0.5

    heldout = [json.loads(line) for line in (DATA / "heldout.jsonl").read_text().splitlines() if line.strip()]
    train_questions = {json.loads(line)["messages"][0]["content"] for line in (DATA / "train.jsonl").read_text().splitlines()}
    assert not train_questions & {r["messages"][0]["content"] for r in heldout}, "held-out questions must be unseen"

    model = InferenceModel.load(str(smollm2_dir), {"persona": str(out)})
    base_rate, base_answers = _name_rate(model, "base", heldout)
    tuned_rate, tuned_answers = _name_rate(model, "persona", heldout)
    print("base:", base_rate, base_answers[:3], "\ntuned:", tuned_rate, tuned_answers[:3])
    assert base_rate <= 0.1
    assert tuned_rate >= 0.8
