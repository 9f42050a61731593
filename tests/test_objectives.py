"""The objective seam (`loraforge/objectives/`): one place maps a run config to its objective, and each objective's
data, collation, target count and loss module agree with one another on real (tiny) models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from loraforge.config import TaskType, config_from_dict  # noqa: E402
from loraforge.errors import DataError  # noqa: E402

ROWS = {
    "CAUSAL_LM": [{"instruction": "Say hi.", "output": "Hello there!"}, {"instruction": "Name a colour.", "output": "Blue."}],
    "SEQ_2_SEQ_LM": [{"input": "red", "output": "rouge"}, {"input": "green cat", "output": "chat vert"}],
    "SEQ_CLS": [{"text": "I love it", "label": "pos"}, {"text": "awful", "label": "neg"}],
    "TOKEN_CLS": [{"tokens": ["Anna", "in", "Rome"], "tags": ["PER", "O", "LOC"]},
                  {"tokens": ["Bob", "left"], "tags": ["PER", "O"]}],
    "QUESTION_ANSWERING": [{"context": "The cat sat on the mat.", "question": "Where?", "answer": "on the mat"},
                           {"context": "Tom is 12.", "question": "Who is 12?", "answer": "Tom"}],
    "FEATURE_EXTRACTION": [{"anchor": "a cat", "positive": "a kitten"}, {"anchor": "a car", "positive": "an auto"}],
}


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("objectives")


def test_task_type_dispatch(tmp_path, smollm2_tokenizer):
    """Moved from test_data_dataset.py: the one dispatch from task type to its data is the objective's."""
    from loraforge.objectives import build_data

    rows = write_rows(tmp_path / "cls.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    cls = build_data(config_from_dict({"metadata_path": str(rows), "task_type": "SEQ_CLS"}), smollm2_tokenizer)
    assert type(cls).__name__ == "TaskDataBundle" and len(cls.train) == 2  # routed to data/tasks.py
    cfg = config_from_dict({"metadata_path": str(rows)}).model_copy(update={"task_type": TaskType.TEXT_TO_IMAGE})
    with pytest.raises(DataError) as info:
        build_data(cfg, smollm2_tokenizer)
    problem = info.value.problems[0]
    assert (problem.key, problem.value) == ("task_type", "TEXT_TO_IMAGE") and "CAUSAL_LM" in problem.allowed
    assert "image" in problem.fix


def test_build_datasets_reads_causal_rows_only(tmp_path, smollm2_tokenizer):
    """The causal-LM builder no longer dispatches (that was the second dispatch): it names the one that does."""
    from loraforge.data.dataset import build_datasets

    rows = write_rows(tmp_path / "cls.jsonl", ROWS["SEQ_CLS"])
    with pytest.raises(DataError) as info:
        build_datasets(config_from_dict({"metadata_path": str(rows), "task_type": "SEQ_CLS"}), smollm2_tokenizer)
    problem = info.value.problems[0]
    assert (problem.key, problem.value, problem.allowed) == ("task_type", "SEQ_CLS", "CAUSAL_LM")
    assert "objectives.build_data" in problem.fix


def test_every_text_task_type_has_an_objective():
    from loraforge.objectives import OBJECTIVES, STAGE_OBJECTIVES, TASK_OBJECTIVES

    assert set(TASK_OBJECTIVES) == {t.value for t in TaskType if t is not TaskType.TEXT_TO_IMAGE}
    assert set(TASK_OBJECTIVES.values()) | set(STAGE_OBJECTIVES.values()) == set(OBJECTIVES)


@pytest.mark.parametrize("task", list(ROWS))
def test_objective_batch_fields_targets_and_loss_agree(task, tmp_path, root):
    """For each objective on a tiny real model: the collated batch holds exactly its declared fields, its loss
    module takes them and returns (sum, count) with count = the examples' targets, and the sum is a real,
    differentiable loss of the model (its gradient reaches the weights)."""
    from loraforge.models.loader import load_model, load_tokenizer
    from loraforge.models.tiny import tiny_model_dir
    from loraforge.objectives import objective_for

    data_file = write_rows(tmp_path / "train.jsonl", ROWS[task])
    cfg = config_from_dict({"metadata_path": str(data_file), "task_type": task, "cutoff_len": 64,
                            "tokenized_cache": False})
    labels = {"SEQ_CLS": 2, "TOKEN_CLS": 3}.get(task)
    model_dir = tiny_model_dir("t5" if task == "SEQ_2_SEQ_LM" else "llama", root, TaskType[task], num_labels=labels)
    objective = objective_for(cfg)
    tokenizer = load_tokenizer(model_dir)
    data = objective.build_data(cfg, tokenizer)
    batch = objective.collate(data.train, [[0], [1]], tokenizer.pad_token_id, cfg)
    assert set(objective.batch_fields) <= set(batch) <= set(objective.batch_fields) | set(objective.optional_fields)

    model = load_model(model_dir, cfg.task_type, dtype="float32")
    loss = objective.loss(model, cfg)
    assert loss.model is model
    total, count = loss(**batch)
    assert int(count) == sum(objective.targets(e) for e in data.train[:2]) > 0
    assert total.ndim == 0 and torch.isfinite(total) and total.item() > 0
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_contrastive_loss_is_a_module_and_prefers_matching_pairs(root):
    """`ContrastiveLoss` is an nn.Module class (it was a factory function in data/tasks.py); on a tiny encoder,
    pairs whose positive is the anchor itself score a lower InfoNCE than pairs matched with each other's text."""
    from loraforge.models.loader import load_model
    from loraforge.models.tiny import tiny_model_dir
    from loraforge.objectives.contrastive import ContrastiveLoss

    assert isinstance(ContrastiveLoss, type) and issubclass(ContrastiveLoss, torch.nn.Module)
    model = load_model(tiny_model_dir("llama", root, TaskType.FEATURE_EXTRACTION), TaskType.FEATURE_EXTRACTION,
                       dtype="float32").eval()
    a = torch.tensor([[5, 6, 7, 8], [90, 91, 92, 93]])
    mask = torch.ones_like(a)
    loss = ContrastiveLoss(model)
    with torch.no_grad():
        same, n = loss(torch.tensor(2), torch.cat([a, a]), torch.cat([mask, mask]))
        swapped, _ = loss(torch.tensor(2), torch.cat([a, a.flip(0)]), torch.cat([mask, mask]))
    assert int(n) == 2 and same < swapped
