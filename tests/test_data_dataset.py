"""Train/val sets from a config: overlong handling, splits, stats and the tokenized cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraforge.config import config_from_dict
from loraforge.data.checks import format_stats, percentile
from loraforge.data.dataset import build_datasets, split_rows
from loraforge.errors import DataError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def rows_with_long_answers(n: int = 12) -> list[dict]:
    # every third answer is long; every other is short
    return [{"instruction": f"Question {i}?", "output": ("word " * 120 if i % 3 == 0 else f"Answer {i}.")}
            for i in range(n)]


def test_truncate_vs_drop(tmp_path, smollm2_tokenizer):
    data = write_rows(tmp_path / "t.jsonl", rows_with_long_answers())
    base = {"metadata_path": str(data), "cutoff_len": 64, "tokenized_cache": False}
    cut = build_datasets(config_from_dict({**base, "overlong": "truncate"}), smollm2_tokenizer)
    assert (cut.stats.examples, cut.stats.truncated, cut.stats.dropped, cut.stats.over_cutoff) == (12, 4, 0, 4)
    assert max(len(e) for e in cut.train) == 64 and cut.stats.max > 64  # percentiles describe the data, not the cut
    dropped = build_datasets(config_from_dict({**base, "overlong": "drop"}), smollm2_tokenizer)
    assert (dropped.stats.examples, dropped.stats.truncated, dropped.stats.dropped) == (8, 0, 4)
    assert all(len(e) <= 64 for e in dropped.train) and dropped.val is None
    assert dropped.stats.trained_tokens == sum(e.trained_tokens for e in dropped.train)
    text = format_stats(cut.stats)
    assert "12 training examples" in text and "cutoff_len 64" in text and "truncated 4, dropped 0" in text


def test_prompt_longer_than_cutoff_is_dropped_and_all_dropped_is_an_error(tmp_path, smollm2_tokenizer):
    data = write_rows(tmp_path / "t.jsonl", [{"instruction": "long " * 100, "output": "A"}] * 2)
    cfg = config_from_dict({"metadata_path": str(data), "cutoff_len": 32, "tokenized_cache": False})
    with pytest.raises(DataError) as info:
        build_datasets(cfg, smollm2_tokenizer)
    problem = info.value.problems[0]
    assert problem.key == "cutoff_len" and problem.value == 32 and "raise cutoff_len" in problem.fix


@pytest.mark.parametrize("val_size, n_val", [(0.1, 6), (0.25, 15), (5, 5), (1, 1)])
def test_val_split_sizes(smollm2_tokenizer, val_size, n_val):
    cfg = config_from_dict({"metadata_path": str(EXAMPLES / "medical_qa" / "train.jsonl"), "val_size": val_size,
                            "tokenized_cache": False, "seed": 7})
    bundle = build_datasets(cfg, smollm2_tokenizer)
    assert len(bundle.val) == n_val and len(bundle.train) == 60 - n_val and bundle.stats.val_examples == n_val
    sources = {e.source for e in bundle.train} | {e.source for e in bundle.val}
    assert len(sources) == 60  # disjoint and complete
    again = build_datasets(cfg, smollm2_tokenizer)
    assert [e.source for e in again.val] == [e.source for e in bundle.val]  # seeded


def test_split_rows_errors_and_seed():
    rows = list(range(10))
    assert split_rows(rows, 0.3, 1) != split_rows(rows, 0.3, 2)
    with pytest.raises(DataError) as info:
        split_rows(rows, 10, 0)
    assert info.value.problems[0].key == "val_size"


def test_val_file_and_conflicts(tmp_path, smollm2_tokenizer):
    train = str(EXAMPLES / "medical_qa" / "train.jsonl")
    cfg = config_from_dict({"metadata_path": train, "val_file": str(EXAMPLES / "medical_qa" / "val.jsonl"),
                            "tokenized_cache": False})
    bundle = build_datasets(cfg, smollm2_tokenizer)
    assert len(bundle.train) == 60 and len(bundle.val) == 10
    with pytest.raises(DataError) as info:
        build_datasets(config_from_dict({"metadata_path": train, "val_file": str(tmp_path / "no.jsonl")}),
                       smollm2_tokenizer)
    assert info.value.problems[0].key == "val_file"
    with pytest.raises(DataError) as info:
        # the config loader refuses this too; model_copy skips validation to reach the data layer's own check
        build_datasets(cfg.model_copy(update={"val_size": 0.1}), smollm2_tokenizer)
    assert info.value.problems[0].key == "val_size"
    with pytest.raises(DataError) as info:
        build_datasets(config_from_dict({"metadata_path": train}).model_copy(update={"val_size": 2.5}),
                       smollm2_tokenizer)
    assert info.value.problems[0].key == "val_size" and "whole" in info.value.problems[0].message


def test_bad_rows_in_train_and_val_are_reported_together(tmp_path, smollm2_tokenizer):
    train = write_rows(tmp_path / "train.jsonl", [{"instruction": "Q", "output": "A"}, {"instruction": "Q"}])
    val = write_rows(tmp_path / "val.jsonl", [{"messages": [{"role": "user", "content": "Q"}]}])
    cfg = config_from_dict({"metadata_path": str(train), "val_file": str(val)})
    with pytest.raises(DataError) as info:
        build_datasets(cfg, smollm2_tokenizer)
    assert {p.key for p in info.value.problems} == {f"{train}:2", f"{val}:1"}


def test_cache_hit_is_identical_and_changes_invalidate(tmp_path, smollm2_tokenizer):
    data = write_rows(tmp_path / "t.jsonl", rows_with_long_answers(6))
    cfg = config_from_dict({"metadata_path": str(data), "cutoff_len": 48, "val_size": 2})
    first = build_datasets(cfg, smollm2_tokenizer)
    assert not first.cache_hit
    cached = list((tmp_path / "cache" / "tokenized").glob("*/bundle.json"))
    assert len(cached) == 1 and not list(cached[0].parent.glob(".bundle-*"))  # written atomically, no leftovers
    second = build_datasets(cfg, smollm2_tokenizer)
    assert second.cache_hit
    assert (second.train, second.val, second.stats) == (first.train, first.val, first.stats)
    # an option that changes the encoding → a new entry
    options = {"metadata_path": str(data), "val_size": 2}
    assert not build_datasets(config_from_dict({**options, "cutoff_len": 40}), smollm2_tokenizer).cache_hit
    # a changed data file → re-encoded, with the new content
    write_rows(data, rows_with_long_answers(6) + [{"instruction": "New?", "output": "Yes."}])
    third = build_datasets(cfg, smollm2_tokenizer)
    assert not third.cache_hit and len(third.train) + len(third.val) == 7
    # a damaged entry is rebuilt, never trusted
    cached[0].write_text("{not json", encoding="utf-8")
    write_rows(data, rows_with_long_answers(6))
    assert not build_datasets(cfg, smollm2_tokenizer).cache_hit
    assert build_datasets(cfg, smollm2_tokenizer).train == first.train


def test_percentile_nearest_rank():
    assert percentile([], 50) == 0
    assert [percentile(list(range(1, 101)), q) for q in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert percentile([7], 99) == 7


def test_system_prompt_and_template_options_reach_the_tokens(smollm2_tokenizer):
    tok = smollm2_tokenizer
    base = {"metadata_path": str(EXAMPLES / "persona" / "train.jsonl"), "tokenized_cache": False}
    default = build_datasets(config_from_dict(base), tok).train[0]
    assert "named SmolLM" in tok.decode(default.input_ids)  # SmolLM2's template injects its own system prompt
    ours = build_datasets(config_from_dict({**base, "system_prompt": "You are Quillon."}), tok).train[0]
    assert "You are Quillon." in tok.decode(ours.input_ids) and "SmolLM" not in tok.decode(ours.input_ids)
    prompt_too = build_datasets(config_from_dict({**base, "train_on_prompt": True}), tok).train[0]
    assert prompt_too.labels == prompt_too.input_ids and default.trained_tokens < prompt_too.trained_tokens
    alpaca = build_datasets(config_from_dict({**base, "template": "alpaca"}), tok).train[0]
    assert tok.decode(alpaca.input_ids).startswith("Below is an instruction")
