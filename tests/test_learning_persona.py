"""Fine-tuning visibly teaches the real model (issues 2 and 14): after a LoRA run on the shipped persona data,
SmolLM2 answers held-out, paraphrased identity questions as the persona; the base model never does.

Issue 14: the config is the article's flat YAML and nothing more (no `target_modules`, no `method`): the defaults
alone must teach, and the result is scored through plain transformers + PEFT greedy decoding, not loraforge's own
inference code."""

import json
import time
from pathlib import Path

import pytest

from loraforge.config import config_from_dict
from loraforge.train.loop import train

DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "persona"
# the article's values, verbatim (78 rows x 3 epochs / batch 4 = 60 optimizer steps)
ARTICLE = dict(task_type="text-generation", lora_rank=16, lora_alpha=32, batch_size=4, epochs=3, learning_rate=2e-4)
# the base model's own identity: an answer naming it has not taken the persona
BASE_IDENTITY = ("smollm", "hugging face")


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def _persona_answers(model, tokenizer, rows: list[dict]) -> tuple[int, list[str]]:
    """Greedy answers (plain `generate`, one left-padded batch) and how many take the persona: they contain the
    row's `expect` (the name, or the maker for "who made you" questions) and do not name the base identity."""
    import torch

    tokenizer.padding_side = "left"
    prompts = [tokenizer.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=False) for r in rows]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    hits = sum(r["expect"].lower() in a.lower() and not any(b in a.lower() for b in BASE_IDENTITY)
               for r, a in zip(rows, answers))
    return hits, answers


@pytest.mark.slow
def test_article_config_teaches_the_persona(smollm2_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    heldout = _rows("heldout.jsonl")
    train_questions = {r["messages"][0]["content"] for r in _rows("train.jsonl")}
    assert len(heldout) >= 12
    assert not train_questions & {r["messages"][0]["content"] for r in heldout}, "held-out questions must be unseen"

    out = tmp_path / "persona"
    cfg = config_from_dict(dict(base_model=str(smollm2_dir), metadata_path=str(DATA / "train.jsonl"),
                                output_dir=str(out), **ARTICLE))
    started = time.perf_counter()
    result = train(cfg, echo=lambda _m: None)
    trained_s = time.perf_counter() - started
    assert result.global_step == 60

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    base_hits, base_answers = _persona_answers(base, tokenizer, heldout)
    tuned = PeftModel.from_pretrained(base, str(out)).eval()
    tuned_hits, tuned_answers = _persona_answers(tuned, tokenizer, heldout)
    print(f"trained {trained_s:.0f}s, final loss {result.final_loss:.3f}; base {base_hits}/{len(heldout)}, "
          f"tuned {tuned_hits}/{len(heldout)}", *zip((r["messages"][0]["content"] for r in heldout), tuned_answers),
          sep="\n")
    assert base_hits == 0, base_answers
    assert tuned_hits >= 0.9 * len(heldout), list(zip((r["messages"][0]["content"] for r in heldout), tuned_answers))
