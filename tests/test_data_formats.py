"""Stage 1: files → rows → messages. Every bad line is reported as file:line, all in one error."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from loraforge.data.formats import (MAX_SHOWN_PROBLEMS, Row, load_conversations, read_rows, resolve_train_files,
                                    row_to_messages)
from loraforge.errors import DataError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def by_key(err: DataError) -> dict[str, str]:
    return {p.key: p.message for p in err.problems}


def test_every_bad_line_kind_is_reported_once_with_file_and_line(tmp_path):
    good = json.dumps({"instruction": "Q", "output": "A"})
    path = write_lines(tmp_path / "bad.jsonl", [
        good,                                                                           # 1 ok
        '{"instruction": "Q", "output": "A"',                                           # 2 invalid JSON
        '["not", "an", "object"]',                                                      # 3 not an object
        json.dumps({"instruction": "Q"}),                                               # 4 missing output
        json.dumps({"prompt": "Q", "answer": "A"}),                                     # 5 neither format
        json.dumps({"instruction": "Q", "output": "   "}),                              # 6 empty output
        json.dumps({"messages": [{"role": "assistant", "content": "A"}]}),              # 7 wrong order
        json.dumps({"messages": [{"role": "user", "content": "Q"}]}),                   # 8 ends with user
        json.dumps({"messages": [{"role": "usr", "content": "Q"}, {"role": "assistant", "content": "A"}]}),  # 9 role
        json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "A"}]}),   # 10 type
        "",                                                                             # 11 blank: skipped
        json.dumps({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": ""}]}),  # 12
        good,                                                                           # 13 ok
    ])
    with pytest.raises(DataError) as info:
        load_conversations([path])
    problems = by_key(info.value)
    assert set(problems) == {f"{path}:{n}" for n in (2, 3, 4, 5, 6, 7, 8, 9, 10, 12)}
    assert problems[f"{path}:2"].startswith("invalid JSON")
    assert problems[f"{path}:3"] == "row is not a JSON object"
    assert problems[f"{path}:4"] == "missing `output`"
    assert "neither `instruction`/`output` nor `messages`" in problems[f"{path}:5"]
    assert problems[f"{path}:6"] == "empty output"
    assert "wrong role order" in problems[f"{path}:7"] and "expected `user`" in problems[f"{path}:7"]
    assert "must end with an assistant reply" in problems[f"{path}:8"]
    assert "unknown role" in problems[f"{path}:9"]
    usr = next(p for p in info.value.problems if p.key == f"{path}:9")
    assert usr.value == "usr" and usr.fix == "did you mean `user`?" and "system, user, assistant" in usr.allowed
    assert "content must be a string" in problems[f"{path}:10"]
    assert problems[f"{path}:12"].startswith("empty output")
    text = info.value.format()
    assert f"{path}:2: invalid JSON" in text and "10 problems" in text


def test_typo_in_a_key_gets_a_suggestion(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [json.dumps({"instrution": "Q", "output": "A"})])
    with pytest.raises(DataError) as info:
        load_conversations([path])
    (problem,) = info.value.problems
    assert problem.key == f"{path}:1" and problem.message == "missing `instruction`"
    path = write_lines(tmp_path / "u.jsonl", [json.dumps({"instrucion": "Q", "ouput": "A"})])
    with pytest.raises(DataError) as info:
        load_conversations([path])
    assert info.value.problems[0].fix == "did you mean `instruction`?"


def test_many_problems_show_the_first_twenty_and_the_total(tmp_path):
    path = write_lines(tmp_path / "many.jsonl", ["{oops"] * 35)
    with pytest.raises(DataError) as info:
        load_conversations([path])
    shown = info.value.problems
    assert len(shown) == MAX_SHOWN_PROBLEMS + 1
    assert shown[0].key == f"{path}:1" and shown[19].key == f"{path}:20"
    assert "15 more problems (35 in total)" in shown[-1].message
    assert "35 problems in total" in info.value.format()


def test_problems_of_several_files_come_together(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", ["{"])
    b = write_lines(tmp_path / "b.jsonl", [json.dumps({"instruction": "Q"})])
    with pytest.raises(DataError) as info:
        load_conversations([a, b, tmp_path / "missing.jsonl"])
    assert set(by_key(info.value)) == {f"{a}:1", f"{b}:1", str(tmp_path / "missing.jsonl")}


def test_json_array_rows_know_their_real_line(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n\n  {\n    "instruction": "c",\n'
                    '    "output": ""\n  },\n  42,\n  {"instruction": "e", "output": "f"}\n]\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_rows(path)
    # read_rows reports the non-object (line 8); row checks happen in load_conversations
    assert by_key(info.value) == {f"{path}:8": "array element [2] is not a JSON object"}
    with pytest.raises(DataError) as info:
        load_conversations([path])
    assert set(by_key(info.value)) == {f"{path}:4", f"{path}:8"}  # empty output of the object starting on line 4
    ok = tmp_path / "ok.json"
    ok.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": "c", "output": "d"}]', encoding="utf-8")
    assert [r.source for r in read_rows(ok)] == [f"{ok}:1", f"{ok}:2"]


def test_json_array_syntax_error_names_its_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]', encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_rows(path)
    (problem,) = info.value.problems
    assert problem.key == f"{path}:3" and problem.message.startswith("invalid JSON")
    obj = tmp_path / "obj.json"
    obj.write_text('{"instruction": "a", "output": "b"}', encoding="utf-8")  # one JSON object: read as JSON Lines
    assert len(read_rows(obj)) == 1


def test_shared_alpaca_demo_parses_with_line_numbers():
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_en_demo.json"
    if not path.is_file():
        pytest.skip("shared demo data not present")
    conversations = load_conversations([path])
    assert len(conversations) == len(json.loads(path.read_text(encoding="utf-8")))
    first_line = int(conversations[1][0].rsplit(":", 1)[1])
    assert first_line > 1 and path.read_text(encoding="utf-8").splitlines()[first_line - 1].strip().startswith("{")


def test_csv_rows(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('instruction,input,output\nQ1,,A1\n"multi\nline",ctx,A2\nQ3,,\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_conversations([path])
    assert by_key(info.value) == {f"{path}:5": "empty output"}
    rows = read_rows(path)
    assert [r.source for r in rows] == [f"{path}:2", f"{path}:3", f"{path}:5"]
    assert row_to_messages(rows[1])[0]["content"] == "multi\nline\n\nctx"


def test_alpaca_row_becomes_messages_with_input_history_and_system():
    row = Row("f:1", {"instruction": "Summarize.", "input": "Some text.", "output": "Short.", "system": "Be brief.",
                      "history": [["Hi", "Hello"]]})
    assert row_to_messages(row, system_prompt="ignored: the row has its own") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Summarize.\n\nSome text."}, {"role": "assistant", "content": "Short."},
    ]
    plain = row_to_messages(Row("f:2", {"instruction": "Q", "input": "", "output": "A"}), system_prompt="S")
    assert plain == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                     {"role": "assistant", "content": "A"}]
    with pytest.raises(DataError, match="history"):
        row_to_messages(Row("f:3", {"instruction": "Q", "output": "A", "history": ["oops"]}))


def test_chat_and_sharegpt_rows():
    chat = Row("f:1", {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                                    {"role": "assistant", "content": "A"}]})
    assert row_to_messages(chat, system_prompt="other")[0] == {"role": "system", "content": "S"}
    share = Row("f:2", {"system": "S", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]})
    assert row_to_messages(share) == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                                      {"role": "assistant", "content": "A"}]
    with pytest.raises(DataError) as info:
        row_to_messages(Row("f:3", {"conversations": [{"from": "bot", "value": "A"}]}))
    assert info.value.problems[0].key == "f:3" and "human" in info.value.problems[0].allowed
    with pytest.raises(DataError, match="non-empty list"):
        row_to_messages(Row("f:4", {"messages": []}))
    with pytest.raises(DataError, match=r"messages\[1\] is `user`, expected `assistant`"):
        row_to_messages(Row("f:5", {"messages": [{"role": "user", "content": "Q"}, {"role": "user", "content": "Q"}]}))


def test_resolve_train_files(tmp_path):
    cfg = SimpleNamespace(metadata_path=None, train_data_dir=None)
    with pytest.raises(DataError) as info:
        resolve_train_files(cfg)
    assert info.value.problems[0].key == "metadata_path" and "metadata_path:" in info.value.problems[0].fix
    cfg.metadata_path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as info:
        resolve_train_files(cfg)
    p = info.value.problems[0]
    assert (p.key, p.value) == ("metadata_path", str(tmp_path / "nope.jsonl")) and p.fix
    cfg.metadata_path, cfg.train_data_dir = None, tmp_path / "nodir"
    with pytest.raises(DataError) as info:
        resolve_train_files(cfg)
    assert info.value.problems[0].key == "train_data_dir" and info.value.problems[0].value == str(tmp_path / "nodir")
    cfg.train_data_dir = EXAMPLES / "medical_qa"
    assert [f.name for f in resolve_train_files(cfg)] == ["train.jsonl", "val.jsonl"]
    cfg.metadata_path = EXAMPLES / "medical_qa" / "train.jsonl"  # metadata_path wins, as in the article's YAML
    assert resolve_train_files(cfg) == [EXAMPLES / "medical_qa" / "train.jsonl"]


def test_shipped_demo_data_is_valid():
    med = load_conversations([EXAMPLES / "medical_qa" / "train.jsonl"])
    assert len(med) >= 50 and sum("\n\n" in m[0]["content"] for _, m in med) >= 3  # some rows use `input`
    assert len(load_conversations([EXAMPLES / "medical_qa" / "val.jsonl"])) >= 8
    persona = load_conversations([EXAMPLES / "persona" / "train.jsonl"])
    assert len(persona) >= 78 and all("Quillon" in m[-1]["content"] for _, m in persona)
    train_questions = {m[0]["content"] for _, m in persona}
    heldout = [json.loads(line) for line in (EXAMPLES / "persona" / "heldout.jsonl").read_text().splitlines()]
    assert len(heldout) >= 12 and {h["expect"] for h in heldout} == {"Quillon", "Ferrovia Labs"}
    assert not train_questions & {h["messages"][0]["content"] for h in heldout}
