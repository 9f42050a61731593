"""Fine-tuning visibly teaches the real model (issues 2 and 14): after a short LoRA run on the persona data, SmolLM2
answers held-out, paraphrased identity questions with its new name; the base model never does. Issue 14: the
config has only the article's keys (no `target_modules`, no `method`): the defaults alone must teach."""

import json
from pathlib import Path

import pytest

from loraforge.config import config_from_dict
from loraforge.inference import GenerationSettings, InferenceModel
from loraforge.train.loop import train

DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "persona"
# The article's own values (batch 4, 3 epochs, 2e-4) gave 0/15 on these 40 rows (30 steps, final loss 2.07):
# too few steps for this small set. The previously measured setting of this test is used (not re-measured yet
# with the default targets and dropout).
BATCH_SIZE, EPOCHS, LEARNING_RATE = 8, 6, 1e-3


def _name_rate(model: InferenceModel, adapter: str, rows: list[dict]) -> tuple[float, list[str]]:
    settings = GenerationSettings(max_new_tokens=24, temperature=0.0)
    answers = [r.text for r in model.generate_batch([r["messages"] for r in rows], adapter=adapter, settings=settings)]
    hits = sum(r["expect"].lower() in a.lower() for r, a in zip(rows, answers))
    return hits / len(rows), answers


@pytest.mark.slow
def test_defaults_learn_the_persona_and_generalize(smollm2_dir, tmp_path):
    out = tmp_path / "persona"
    # the article's flat YAML and nothing more: every other key (target_modules included) is loraforge's default
    cfg = config_from_dict(dict(
        base_model=str(smollm2_dir), metadata_path=str(DATA / "train.jsonl"), task_type="text-generation",
        lora_rank=16, lora_alpha=32, batch_size=BATCH_SIZE, epochs=EPOCHS, learning_rate=LEARNING_RATE, output_dir=str(out)))
    result = train(cfg, echo=lambda _m: None)
    assert result.final_loss is not None

    heldout = [json.loads(line) for line in (DATA / "heldout.jsonl").read_text().splitlines() if line.strip()]
    train_questions = {json.loads(line)["messages"][0]["content"] for line in (DATA / "train.jsonl").read_text().splitlines()}
    assert not train_questions & {r["messages"][0]["content"] for r in heldout}, "held-out questions must be unseen"

    model = InferenceModel.load(str(smollm2_dir), {"persona": str(out)})
    base_rate, base_answers = _name_rate(model, "base", heldout)
    tuned_rate, tuned_answers = _name_rate(model, "persona", heldout)
    print("base:", base_rate, base_answers[:3], "\ntuned:", tuned_rate, tuned_answers[:3])
    assert base_rate <= 0.1
    assert tuned_rate >= 0.8, tuned_answers
