"""Data and config mistakes that used to raise tracebacks give a clear error naming the file:line or key (issue 22,
points 9-11)."""

import json

import pytest

from loraforge.errors import ConfigError, DataError, LoraforgeError


def _problems(path):
    from loraforge.data.formats import load_conversations

    with pytest.raises(LoraforgeError) as e:
        load_conversations([path])
    return e.value.problems


@pytest.mark.parametrize("field", ["output", "instruction"])
def test_null_output_or_instruction_names_the_line(tmp_path, field):
    path = tmp_path / "d.jsonl"
    row = {"instruction": "q", "output": "a"}
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, field: None}) + "\n")
    problems = _problems(path)
    assert [p.key for p in problems] == [f"{path}:2"] and f"`{field}` is null" in problems[0].message


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_lone_surrogate_and_duplicate_keys_name_the_line(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    lines = ['{"instruction": "q", "output": "a"}', '{"instruction": "q\\ud800", "output": "a"}']
    path.write_text("\n".join(lines) if suffix == ".jsonl" else "[" + ",\n".join(lines) + "]")
    problems = _problems(path)
    assert problems[0].key == f"{path}:2" and "lone surrogate" in problems[0].message, problems
    lines[1] = '{"instruction": "q", "output": "first", "output": "second"}'
    path.write_text("\n".join(lines) if suffix == ".jsonl" else "[" + ",\n".join(lines) + "]")
    problems = _problems(path)
    assert problems[0].key == f"{path}:2" and "key `output` appears twice" in problems[0].message, problems


def test_a_gbk_config_file_names_the_file_and_the_fix(tmp_path):
    from loraforge.config import load_config

    path = tmp_path / "c.yaml"
    path.write_bytes("base_model: smollm2\nsystem_prompt: 你是医生\n".encode("gbk"))
    with pytest.raises(ConfigError, match=r"c.yaml:2: not UTF-8 text") as e:
        load_config(path)
    assert "save the file as UTF-8" in e.value.format()


@pytest.mark.parametrize("key,value", [("seed", -1), ("seed", 2**40), ("epochs", float("inf")),
                                       ("learning_rate", float("nan"))])
def test_out_of_range_numbers_are_config_errors(tmp_path, key, value):
    from loraforge.config import config_from_dict

    with pytest.raises(ConfigError) as e:
        config_from_dict({"base_model": "smollm2", "metadata_path": "d.jsonl", key: value})
    assert any(p.key == key for p in e.value.problems), e.value.format()


def test_merge_into_a_non_empty_dir_suggests_a_flag_merge_has(tmp_path):
    from typer.testing import CliRunner

    from loraforge.cli import app

    result = CliRunner().invoke(app, ["merge", "--help"])
    assert "--overwrite" in result.output
