"""Task datasets (SEQ_2_SEQ_LM, SEQ_CLS, TOKEN_CLS, QUESTION_ANSWERING, FEATURE_EXTRACTION): encoding, label
alignment, file:line errors, and collation."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from loraforge.config import config_from_dict  # noqa: E402
from loraforge.data.tasks import IGNORE_INDEX, build_task_datasets, collate_task, infer_label_names  # noqa: E402
from loraforge.errors import DataError  # noqa: E402


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _cfg(tmp_path, task, rows, **kw):
    return config_from_dict({"task_type": task, "method": "lora", "metadata_path": str(_write(tmp_path / "d.jsonl", rows)),
                             **kw})


def test_seq2seq_input_output_and_instruction_rows(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    cfg = _cfg(tmp_path, "SEQ_2_SEQ_LM", [{"input": "hello", "output": "bonjour"},
                                          {"instruction": "Translate", "input": "cat", "output": "chat"}])
    data = build_task_datasets(cfg, tok)
    a, b = data.train
    assert a.input_ids == tok("hello")["input_ids"]
    assert a.labels == tok("bonjour")["input_ids"] + [tok.eos_token_id] and a.num_targets == len(a.labels)
    assert b.input_ids == tok("Translate\ncat")["input_ids"]
    batch = collate_task(data.train, [[0], [1]], tok.pad_token_id, "SEQ_2_SEQ_LM")
    assert batch["num_targets"].item() == a.num_targets + b.num_targets
    assert (batch["labels"] != IGNORE_INDEX).sum().item() == batch["num_targets"].item()
    assert "decoder_input_ids" not in batch


def test_seq_cls_labels_inferred_sorted_or_given(tmp_path, smollm2_tokenizer):
    rows = [{"text": "great", "label": "pos"}, {"text": "awful", "label": "neg"}, {"text": "ok", "label": "neu"}]
    cfg = _cfg(tmp_path, "text-classification", rows)
    data = build_task_datasets(cfg, smollm2_tokenizer)
    assert data.label_names == ["neg", "neu", "pos"] and [e.label for e in data.train] == [2, 0, 1]
    assert data.id2label == {0: "neg", 1: "neu", 2: "pos"}
    given = build_task_datasets(_cfg(tmp_path, "SEQ_CLS", rows, label_names=["pos", "neg", "neu"]), smollm2_tokenizer)
    assert [e.label for e in given.train] == [0, 1, 2]
    batch = collate_task(given.train, [[0], [1], [2]], 2, "SEQ_CLS")
    assert batch["labels"].tolist() == [0, 1, 2] and batch["num_targets"].item() == 3
    numeric = _cfg(tmp_path, "SEQ_CLS", [{"t": "a", "y": 10}, {"t": "b", "y": 2}], text_column="t", label_column="y")
    assert infer_label_names(numeric) == ["2", "10"]


def test_seq_cls_unknown_label_and_missing_text_are_file_line_errors(tmp_path, smollm2_tokenizer):
    rows = [{"text": "fine", "label": "pos"}, {"text": "bad", "label": "nope"}, {"label": "pos"}]
    with pytest.raises(DataError) as err:
        build_task_datasets(_cfg(tmp_path, "SEQ_CLS", rows, label_names=["pos", "neg"]), smollm2_tokenizer)
    keys = [p.key for p in err.value.problems]
    assert keys == [f"{tmp_path / 'd.jsonl'}:2", f"{tmp_path / 'd.jsonl'}:3"]
    assert err.value.problems[0].allowed == "pos, neg"


def test_token_cls_first_subtoken_carries_the_tag(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    words = ["Angela", "Merkelberger", "visited", "Paris"]
    rows = [{"tokens": words, "tags": ["B-PER", "I-PER", "O", "B-LOC"]}]
    data = build_task_datasets(_cfg(tmp_path, "TOKEN_CLS", rows), tok)
    ex = data.train[0]
    assert data.label_names == ["B-LOC", "B-PER", "I-PER", "O"]
    tagged = [(tok.decode([t]), lab) for t, lab in zip(ex.input_ids, ex.labels)]
    firsts = [lab for _, lab in tagged if lab != IGNORE_INDEX]
    assert firsts == [1, 2, 3, 0] and ex.num_targets == 4
    assert len(ex.input_ids) > len(words)  # "Merkelberger" is several sub-tokens: only the first is labelled
    text = "".join(t for t, _ in tagged)
    assert text.strip() == " ".join(words)


def test_token_cls_tag_count_mismatch(tmp_path, smollm2_tokenizer):
    with pytest.raises(DataError, match="2 tokens but 1 tags"):
        build_task_datasets(_cfg(tmp_path, "TOKEN_CLS", [{"tokens": ["a", "b"], "tags": ["O"]}],
                                 label_names=["O"]), smollm2_tokenizer)


def test_qa_answer_located_as_token_span(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    rows = [{"context": "The Eiffel Tower is in Paris, France.", "question": "Where is the tower?",
             "answer": "Paris, France"}]
    data = build_task_datasets(_cfg(tmp_path, "question-answering", rows), tok)
    ex = data.train[0]
    span = tok.decode(ex.input_ids[ex.start_position:ex.end_position + 1])
    assert span.strip() == "Paris, France"
    batch = collate_task(data.train, [[0]], tok.pad_token_id, "QUESTION_ANSWERING")
    assert batch["start_positions"].tolist() == [ex.start_position] and batch["num_targets"].item() == 1


def test_qa_answer_not_in_context_is_a_file_line_error(tmp_path, smollm2_tokenizer):
    rows = [{"context": "abc", "question": "q", "answer": "abc"},
            {"context": "The sky is blue.", "question": "Colour?", "answer": "green"}]
    with pytest.raises(DataError) as err:
        build_task_datasets(_cfg(tmp_path, "QUESTION_ANSWERING", rows), smollm2_tokenizer)
    (p,) = err.value.problems
    assert p.key.endswith("d.jsonl:2") and "does not occur in the context" in p.message and p.value == "green"


def test_qa_answer_beyond_cutoff(tmp_path, smollm2_tokenizer):
    rows = [{"context": "word " * 50 + "needle", "question": "find it", "answer": "needle"}]
    with pytest.raises(DataError, match="beyond cutoff_len"):
        build_task_datasets(_cfg(tmp_path, "QUESTION_ANSWERING", rows, cutoff_len=16), smollm2_tokenizer)
    rows.append({"context": "a needle", "question": "q", "answer": "needle"})
    data = build_task_datasets(_cfg(tmp_path, "QUESTION_ANSWERING", rows, cutoff_len=16, overlong="drop"),
                               smollm2_tokenizer)
    assert len(data.train) == 1 and data.stats.dropped == 1


def test_feature_extraction_pairs_stack_anchors_then_positives(tmp_path, smollm2_tokenizer):
    rows = [{"anchor": "a cat", "positive": "a kitten"}, {"anchor": "a car", "positive": "an automobile"}]
    data = build_task_datasets(_cfg(tmp_path, "feature-extraction", rows), smollm2_tokenizer)
    batch = collate_task(data.train, [[0], [1]], 2, "FEATURE_EXTRACTION")
    assert batch["input_ids"].shape[0] == 4 and batch["num_targets"].item() == 2
    assert batch["input_ids"][2, :len(data.train[0].pair_ids)].tolist() == data.train[0].pair_ids
    with pytest.raises(DataError, match="`positive` missing"):
        build_task_datasets(_cfg(tmp_path, "FEATURE_EXTRACTION", [{"anchor": "x"}]), smollm2_tokenizer)


def test_contrastive_loss_is_low_when_pairs_match():
    from loraforge.objectives.contrastive import mean_pool

    h = torch.randn(3, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    pooled = mean_pool(h, mask)
    assert torch.allclose(pooled[0], h[0, :2].mean(0)) and torch.allclose(pooled[2], h[2, 0])
    # virtual tokens prepended by prompt tuning are not pooled
    longer = torch.cat([torch.randn(3, 5, 8), h], dim=1)
    assert torch.allclose(mean_pool(longer, mask), pooled)
