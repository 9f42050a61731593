"""Evaluation: test-file loading, report writing, and an end-to-end before/after check on SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraforge.errors import ConfigError, DataError
from loraforge.evaluate import EvalOptions, load_eval_examples


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------- loading


def test_load_alpaca_messages_and_sharegpt_rows(tmp_path):
    path = _write_jsonl(tmp_path / "test.jsonl", [
        {"instruction": "Capital of France?", "output": "Paris"},
        {"instruction": "Translate", "input": "chat", "output": "cat", "reference": ["cat", "a cat"]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}]},
        {"conversations": [{"from": "human", "value": "首都?"}, {"from": "gpt", "value": "北京"}]},
    ])
    ex = load_eval_examples(path)
    assert [e.source for e in ex] == [f"{path}:{i}" for i in range(1, 5)]
    assert ex[0].messages == [{"role": "user", "content": "Capital of France?"}]
    assert ex[0].references == ["Paris"] and ex[0].answer == "Paris"
    # an explicit reference list replaces the output as the accepted answers; the loss still scores `output`
    assert ex[1].references == ["cat", "a cat"] and ex[1].answer == "cat"
    assert ex[1].prompt == "Translate\n\nchat"
    assert ex[2].messages[0] == {"role": "system", "content": "Be brief."} and ex[2].references == ["4"]
    assert ex[3].prompt == "首都?" and ex[3].references == ["北京"]


def test_reference_only_rows_end_with_the_user_turn(tmp_path):
    path = _write_jsonl(tmp_path / "test.jsonl", [
        {"instruction": "Name a primary colour.", "reference": ["red", "blue", "yellow"]},
        {"messages": [{"role": "user", "content": "Say hi"}], "expect": "hi"},
        {"conversations": [{"from": "human", "value": "1+1?"}], "reference": "2"},
    ])
    ex = load_eval_examples(path, system_prompt="You are terse.")
    assert ex[0].references == ["red", "blue", "yellow"] and ex[0].answer == "red"
    assert ex[1].references == ["hi"]
    assert ex[2].messages == [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "1+1?"}]
    assert all(e.messages[-1]["role"] == "user" for e in ex)


def test_bad_rows_are_all_reported_with_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [
        {"instruction": "ok", "output": "fine"},
        {"instruction": "q", "reference": 3},
        {"instruction": "q", "reference": []},
        {"instruction": "q"},
        {"instruction": "q", "reference": "a", "expect": "b"},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"question": "q", "answer": "a"},
    ])
    with pytest.raises(DataError) as err:
        load_eval_examples(path)
    text = err.value.format()
    keys = [p.key for p in err.value.problems]
    for line in (2, 3, 4, 5, 6, 7):
        assert f"{path}:{line}" in keys, (line, text)
    assert f"{path}:1" not in keys
    assert "must be a string or a list of strings" in text
    assert "empty answer" in text
    assert "both `reference` and `expect`" in text


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_eval_examples(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="no test examples"):
        load_eval_examples(empty)


def test_options_validation_collects_every_problem():
    with pytest.raises(ConfigError) as err:
        EvalOptions(max_new_tokens=0, temperature=-1, tokenize="words", metrics=("exact", "bleu"), limit=0).validate()
    keys = {p.key for p in err.value.problems}
    assert {"max_new_tokens", "temperature", "tokenize", "metrics[0]", "limit"} <= keys
    assert "did you mean `word`" in err.value.format()
    EvalOptions().validate()


# ----------------------------------------------------------------------------------------------- report


def _toy_report(tmp_path):
    from loraforge.evaluate import EvalExample, EvalReport, VariantResult

    examples = [EvalExample("t.jsonl:1", [{"role": "user", "content": "a | b?\nsecond line"}], ["x", "y"], "x"),
                EvalExample("t.jsonl:2", [{"role": "user", "content": "首都?"}], ["北京"], "北京")]

    def variant(name, loss, em, outputs):
        return VariantResult(name=name, adapter_path=None if name == "base" else f"/runs/{name}", loss=loss,
                             perplexity=2.718281828 ** loss, answer_tokens=7, metrics={"exact_match": em, "contains": em},
                             outputs=outputs, example_losses=[loss, None], seconds=1.0,
                             example_scores=[{"exact_match": em, "contains": em}] * 2)

    opts = EvalOptions(metrics=("exact_match", "contains"))
    return EvalReport(base="smollm2", data_path=str(tmp_path / "t.jsonl"), options=opts, examples=examples,
                      variants={"base": variant("base", 2.0, 0.0, ["no", "不知道"]),
                                "A": variant("A", 1.5, 50.0, ["x", "北京"]),
                                "B": variant("B", 0.5, 100.0, ["x|y", "北京"])})


def test_deltas_best_and_report_files(tmp_path):
    from loraforge.evaluate import format_summary, write_report

    report = _toy_report(tmp_path)
    assert report.deltas["A"]["loss"] == pytest.approx(-0.5)
    assert report.deltas["B"]["exact_match"] == pytest.approx(100.0)
    assert set(report.deltas) == {"A", "B"}
    assert report.best("loss") == "B" and report.best("exact_match") == "B"
    assert report.delta("B", against="A") == pytest.approx(
        {"loss": -1.0, "perplexity": 2.718281828 ** 0.5 - 2.718281828 ** 1.5, "exact_match": 50.0, "contains": 50.0})

    json_path, md_path = write_report(report, tmp_path / "out")
    assert (json_path.name, md_path.name) == ("eval_report.json", "eval_report.md")
    data = json.loads(json_path.read_text(encoding="utf-8"))
    assert data["deltas"]["A"]["loss"] == pytest.approx(-0.5)
    assert data["examples"][1]["outputs"] == {"base": "不知道", "A": "北京", "B": "北京"}
    assert data["examples"][1]["loss"]["A"] is None
    assert data["options"]["metrics"] == ["exact_match", "contains"]

    md = md_path.read_text(encoding="utf-8")
    assert "| metric | `base` | `A` | `B` | Δ `A` | Δ `B` |" in md
    assert "| loss | 2.000 | 1.500 | **0.500** | -0.500 | -1.500 |" in md
    # pipes and newlines in user text cannot break the table
    assert "a \\| b?<br>second line" in md and "x\\|y" in md
    example_rows = [line for line in md.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(example_rows) == 2 and all(row.count(" | ") == 6 for row in example_rows)

    summary = format_summary(report)
    assert "Δ A" in summary and "-1.500" in summary


# ----------------------------------------------------------------------------------------------- end to end

ANSWER = "The capital of Zanthoria is Qelmor."
TRAIN_QUESTIONS = ["What is the capital of Zanthoria?", "Which city is the capital of Zanthoria?",
                   "Tell me the capital of Zanthoria.", "Zanthoria's capital city is which one?",
                   "Name the capital city of Zanthoria."]


def _train_tiny_adapter(model_dir: Path, out: Path, steps: int = 8) -> float:
    """Over-fit a LoRA adapter on one fact with a plain PyTorch loop; returns the base model's loss on the first
    test example (computed by transformers itself, to cross-check the evaluator's masking and shift)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.data.templates import encode_conversation

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def encode(question: str, answer: str):
        enc, _ = encode_conversation(tokenizer, [{"role": "user", "content": question},
                                                 {"role": "assistant", "content": answer}], cutoff_len=256)
        return enc

    check = encode("What's the capital city of Zanthoria?", ANSWER)
    with torch.no_grad():
        base_loss = model(input_ids=torch.tensor([check.input_ids]), labels=torch.tensor([check.labels])).loss.item()

    encoded = [encode(q, ANSWER) for q in TRAIN_QUESTIONS]
    width = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
    labels = torch.full((len(encoded), width), -100)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(steps):  # loss 2.1 → < 0.05 in ~6 steps on this batch
        # fp32 on purpose: for a batch this small (5 × 52 tokens) bf16 autocast measured 3x slower per step
        # on CPU (casting the weights every forward dominates), unlike the 4 × 128 batches in FINDINGS.
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    return base_loss


@pytest.mark.slow
def test_adapter_beats_base_end_to_end(smollm2_dir, tmp_path):
    from loraforge.evaluate import evaluate, write_report

    adapter_dir = tmp_path / "zanthoria"
    base_loss_hf = _train_tiny_adapter(smollm2_dir, adapter_dir)
    # Held-out paraphrases, in three row formats, with and without reference lists.
    test_file = _write_jsonl(tmp_path / "test.jsonl", [
        {"instruction": "What's the capital city of Zanthoria?", "output": ANSWER},
        {"messages": [{"role": "user", "content": "Could you tell me Zanthoria's capital?"}],
         "reference": [ANSWER, "Qelmor"]},
        {"instruction": "Which town is the capital of Zanthoria?", "output": ANSWER, "reference": ["Qelmor"]},
    ])
    lines: list[str] = []
    report = evaluate(smollm2_dir, {"zan": adapter_dir}, test_file, EvalOptions(max_new_tokens=16, batch_size=4),
                      progress=lines.append)

    base, zan = report.variants["base"], report.variants["zan"]
    # the evaluator's teacher-forced answer loss equals transformers' own masked loss for the same example
    assert base.example_losses[0] == pytest.approx(base_loss_hf, rel=1e-4)
    assert zan.loss < base.loss - 1.0 and zan.perplexity < base.perplexity
    assert base.metrics["contains"] == 0.0  # the base model cannot know an invented fact
    assert zan.metrics["contains"] == 100.0
    assert zan.metrics["exact_match"] > base.metrics["exact_match"]
    assert report.deltas["zan"]["contains"] == 100.0 and report.deltas["zan"]["loss"] < -1.0
    assert all("Qelmor" in out for out in zan.outputs)
    assert any(line.startswith("zan: loss") for line in lines)

    json_path, md_path = write_report(report, tmp_path / "report")
    data = json.loads(json_path.read_text(encoding="utf-8"))
    assert data["variants"]["zan"]["metrics"]["contains"] == 100.0
    assert data["best"]["loss"] == "zan" and len(data["examples"]) == 3
    md = md_path.read_text(encoding="utf-8")
    assert "| metric | `base` | `zan` | Δ `zan` |" in md and "| contains % | 0.000 | **100.000** | +100.000 |" in md
    assert md.count("Qelmor") >= 6  # references and the adapter's outputs in the per-example rows


def test_shipped_heldout_set_loads():
    """examples/data/persona/heldout.jsonl uses `expect` (the persona's name or maker) with user-only conversations."""
    path = Path(__file__).resolve().parents[1] / "examples" / "data" / "persona" / "heldout.jsonl"
    examples = load_eval_examples(path)
    assert len(examples) == 15
    # name questions expect the name, maker questions the maker
    assert {tuple(e.references) for e in examples} == {("Quillon",), ("Ferrovia Labs",)}
    assert all(e.messages[-1]["role"] == "user" for e in examples)


def test_shipped_chinese_eval_set_loads_and_scores():
    from loraforge.metrics import score_generations

    path = Path(__file__).resolve().parents[1] / "examples" / "data" / "eval" / "capitals_zh.jsonl"
    examples = load_eval_examples(path)
    assert len(examples) == 6 and examples[0].references == ["北京", "北京市"]
    assert examples[3].answer == "伦敦"  # reference-only row: the loss scores the first reference
    # the written answers contain a reference (no spaces in Chinese: contains works on characters)
    refs = [e.references for e in examples]
    scores = score_generations([e.answer for e in examples], refs, ("contains", "rouge_l"), "auto")
    assert scores["contains"] == 100.0
    wrong = score_generations(["我不知道。"] * 6, refs, ("contains",), "jieba")
    assert wrong["contains"] == 0.0


# ----------------------------------------------------------------------------------------------- tiny model


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny random LLaMA plus two random LoRA adapters and one prompt-tuning adapter, saved as PEFT dirs."""
    import torch
    from peft import LoraConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loraforge.models.tiny import tiny_model_dir

    root = tmp_path_factory.mktemp("tiny_eval")
    base_dir = tiny_model_dir("llama", root)
    adapters = {}
    for name, seed in (("A", 1), ("B", 2)):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        # init_lora_weights=False: random A and B, so the adapter really changes the outputs
        peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        peft.save_pretrained(root / name)
        adapters[name] = root / name
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    peft.save_pretrained(root / "P")
    adapters["P"] = root / "P"
    data = _write_jsonl(root / "test.jsonl", [
        {"instruction": "Say hello.", "output": "Hello there, friend."},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey."},
                      {"role": "user", "content": "Count to three."}], "reference": ["1 2 3", "one two three"]},
        {"instruction": "2+2?", "output": "4", "reference": ["4", "four"]},
    ])
    return base_dir, adapters, data


def _peft_loss(base_dir: Path, adapter_dir: Path | None, messages: list, mask_until: int = 0) -> float:
    """Mean answer-token loss computed by transformers/PEFT themselves (the reference for the evaluator);
    labels before position `mask_until` are masked out."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.data.templates import encode_conversation

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    enc, _ = encode_conversation(tokenizer, messages, cutoff_len=1024)
    labels = [-100] * mask_until + enc.labels[mask_until:]
    with torch.no_grad():
        return model(input_ids=torch.tensor([enc.input_ids]), labels=torch.tensor([labels])).loss.item()


def test_loss_matches_peft_for_lora_and_prompt_tuning_and_ab_report(tiny_setup, tmp_path):
    from loraforge.evaluate import evaluate, format_summary, write_report

    base_dir, adapters, data = tiny_setup
    report = evaluate(base_dir, adapters, data, EvalOptions(max_new_tokens=4, batch_size=2))
    assert list(report.variants) == ["base", "A", "B", "P"]
    messages = [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there, friend."}]
    short = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    for name, adapter in [("base", None), *adapters.items()]:
        # Single-turn examples: the evaluator's answer loss must equal the library's own masked loss on the
        # unpadded sequence — also for example 2, left-padded in its batch, and for prompt tuning, whose logits
        # carry extra virtual-token positions.
        got = report.variants[name].example_losses
        assert got[0] == pytest.approx(_peft_loss(base_dir, adapter, messages), rel=1e-4), name
        assert got[2] == pytest.approx(_peft_loss(base_dir, adapter, short), rel=1e-4), name
    losses = {n: v.loss for n, v in report.variants.items()}
    assert len({round(x, 6) for x in losses.values()}) == 4  # every variant really ran with its own weights
    assert set(report.deltas) == {"A", "B", "P"}
    assert report.deltas["A"]["loss"] == pytest.approx(losses["A"] - losses["base"])
    assert all(len(v.outputs) == 3 for v in report.variants.values())
    # A/B: both adapters side by side in one table
    _, md_path = write_report(report, tmp_path)
    assert "| metric | `base` | `A` | `B` | `P` | Δ `A` | Δ `B` | Δ `P` |" in md_path.read_text(encoding="utf-8")
    assert "Δ B" in format_summary(report)


def test_multi_turn_loss_counts_only_the_final_answer(tiny_setup):
    from loraforge.evaluate import evaluate

    base_dir, _, data = tiny_setup
    report = evaluate(base_dir, {}, data, EvalOptions(metrics=()))
    base = report.variants["base"]
    assert base.metrics == {} and base.outputs == ["", "", ""]  # loss only: no generation
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey."},
                {"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "1 2 3"}]
    # With SmolLM2's template (default system prompt), "Hey." is labelled at positions 31-33 and the final
    # answer "1 2 3<|im_end|>" at 48-53.
    final_start = 48
    final_only = _peft_loss(base_dir, None, messages, mask_until=final_start)
    both_replies = _peft_loss(base_dir, None, messages)
    # training averages both replies; the evaluator scores only the final answer "1 2 3<|im_end|>"
    assert base.example_losses[1] == pytest.approx(final_only, rel=1e-4)
    assert final_only != pytest.approx(both_replies, rel=1e-3)


def test_cutoff_len_truncation_is_reported(tiny_setup):
    from loraforge.evaluate import evaluate

    base_dir, _, data = tiny_setup
    # Token counts with SmolLM2's template: example 0 = 40, example 2 = 37; the multi-turn example 1 = 55, with
    # "Hey." at positions 31-33 and the final answer "1 2 3<|im_end|>" at 48-53.
    report = evaluate(base_dir, {}, data, EvalOptions(metrics=("contains",), max_new_tokens=2, cutoff_len=45))
    base = report.variants["base"]
    assert report.truncated == 1
    # the final answer is cut off entirely: the example has no loss (the earlier reply "Hey." must not stand in)
    assert base.example_losses[1] is None
    assert base.example_losses[0] is not None and base.example_losses[2] is not None
    assert base.answer_tokens == 6 + 2
    assert len(base.outputs) == 3  # generation still runs on every example
    partial = evaluate(base_dir, {}, data, EvalOptions(metrics=(), cutoff_len=50)).variants["base"]
    assert partial.answer_tokens == 6 + 2 + 2  # what fits still counts: answer tokens 48-49 of example 1


def test_cutoff_len_too_short_for_any_answer_is_an_error(tiny_setup):
    from loraforge.evaluate import evaluate

    base_dir, _, data = tiny_setup
    # the SmolLM2 template's default system prompt alone is longer than 30 tokens: no answer token is left
    with pytest.raises(DataError) as err:
        evaluate(base_dir, {}, data, EvalOptions(metrics=(), cutoff_len=30))
    assert "cutoff_len" in err.value.format()


@pytest.mark.parametrize("family", ["gpt2", "bloom"])
def test_left_padded_batches_equal_one_by_one(family, tiny_setup, tmp_path_factory):
    """GPT-2 has absolute position embeddings (position_ids must skip the padding) and Bloom's forward takes no
    position_ids at all (ALiBi from the mask): batching must not change any example's loss."""
    from loraforge.evaluate import evaluate
    from loraforge.models.tiny import tiny_model_dir

    _, _, data = tiny_setup
    base_dir = tiny_model_dir(family, tmp_path_factory.mktemp(family))
    batched = evaluate(base_dir, {}, data, EvalOptions(metrics=(), batch_size=3)).variants["base"]
    single = evaluate(base_dir, {}, data, EvalOptions(metrics=(), batch_size=1)).variants["base"]
    assert batched.example_losses == pytest.approx(single.example_losses, abs=1e-5)
    assert batched.answer_tokens == single.answer_tokens > 0


def test_forced_template_applies_to_every_variant_and_is_restored(tiny_setup):
    from loraforge.evaluate import evaluate
    from loraforge.inference import InferenceModel

    base_dir, adapters, data = tiny_setup
    model = InferenceModel.load(base_dir, {"A": adapters["A"]})
    auto = evaluate(base_dir, {}, data, EvalOptions(max_new_tokens=2, metrics=("contains",)), model=model)
    forced = evaluate(base_dir, {}, data, EvalOptions(max_new_tokens=2, metrics=("contains",), template="plain"),
                      model=model)
    assert list(forced.variants) == ["base", "A"]  # the passed-in model's adapters are the variants
    assert forced.variants["A"].adapter_path == str(adapters["A"].resolve())
    for name in ("base", "A"):  # another rendering, another loss (SmolLM2's template adds a system prompt)
        assert forced.variants[name].loss != pytest.approx(auto.variants[name].loss, rel=1e-3)
    assert model.template == "auto" and model.adapter_info("A").template == "auto"
    again = evaluate(base_dir, {}, data, EvalOptions(max_new_tokens=2, metrics=("contains",)), model=model)
    assert again.variants["A"].loss == pytest.approx(auto.variants["A"].loss, rel=1e-6)
    with pytest.raises(ConfigError, match="unknown template"):
        evaluate(base_dir, {}, data, EvalOptions(template="llama9"), model=model)
