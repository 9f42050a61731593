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
