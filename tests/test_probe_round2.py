"""Hostile inputs of a second outside probe (issue 22): each kind is refused with the key or file:line and a fix,
before any work and without a traceback; valid input that merely looks odd (U+2028 inside a string, a BOM, CRLF)
is read as meant."""

from __future__ import annotations

import json
import sys
import time

import pytest

from loraforge.errors import ConfigError, LoraforgeError

from test_train_helpers import tiny_llama  # noqa: F401


def _data_problems(path):
    from loraforge.data.formats import load_conversations

    with pytest.raises(LoraforgeError) as e:
        load_conversations([path])
    assert all(p.fix for p in e.value.problems), e.value.format()  # every data problem says how to fix it
    return e.value.problems


GOOD = '{"instruction": "q", "output": "a"}'


@pytest.mark.parametrize("label,suffix,content,line,words", [
    ("nesting deeper than json can read", ".jsonl", GOOD + '\n{"instruction": "q", "output": "a", "m": '
     + "[" * 100_000 + "]" * 100_000 + "}", 2, "nested too deeply"),
    ("an integer of 5000 digits", ".jsonl", '{"instruction": "q", "output": "a", "id": ' + "9" * 5000 + "}", 1,
     "unreadable JSON value"),
    ("an escaped NUL", ".jsonl", '{"instruction": "q\\u0000", "output": "a"}', 1, "NUL character"),
    ("a raw NUL in a CSV cell", ".csv", "instruction,output\nq\x00,a\n", 2, "NUL character"),
    ("a lone surrogate in a key", ".jsonl", '{"instruction\\ud800": "q", "output": "a"}', 1, "lone surrogate"),
    ("two formats in one row", ".jsonl", json.dumps({"instruction": "x", "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}), 1, "mixes two formats"),
    ("a sharegpt system that is a list", ".jsonl", json.dumps({"system": ["s"], "conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}), 1, "`system` must be a string"),
    ("a JSON array saved as .jsonl", ".jsonl", f"[{GOOD}, {GOOD}]", 1, "rename the file to .json"),
    ("rows under a key of a .json object", ".json", json.dumps({"data": [json.loads(GOOD)]}, indent=2), 1,
     "rows seem to be under `data`"),
    ("two rows joined by a form feed", ".jsonl", GOOD + "\x0c" + GOOD, 1, "invalid JSON"),
    ("a content that is a list of parts", ".jsonl", json.dumps({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "q"}]}, {"role": "assistant", "content": "a"}]}), 1,
     "content must be a string"),
])
def test_bad_rows_name_the_line_and_a_fix(tmp_path, label, suffix, content, line, words):
    path = tmp_path / f"d{suffix}"
    path.write_text(content, encoding="utf-8", errors="surrogatepass")
    problems = _data_problems(path)
    assert problems[0].key == f"{path}:{line}" and words in problems[0].format(), (label, problems)


def test_unicode_separators_inside_strings_bom_and_crlf_are_valid(tmp_path):
    from loraforge.data.formats import load_conversations

    path = tmp_path / "d.jsonl"  # str.splitlines would cut the first row at U+2028 and the second at U+0085
    rows = [{"instruction": "line\u2028separator", "output": "a\x85b"}, {"instruction": "q", "output": "a"}]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode())
    out = load_conversations([path])
    assert [m[0]["content"] for _, m in out] == ["line\u2028separator", "q"] and out[0][1][1]["content"] == "a\x85b"
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('instruction,output\n"two\u2028lines",a\nq,b\n', encoding="utf-8")
    assert [s for s, _ in load_conversations([csv_path])] == [f"{csv_path}:2", f"{csv_path}:3"]


# ---------------------------------------------------------------------------------------------- configs


def _config_problem(tmp_path, text: str, key: str):
    from loraforge.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    hits = [p for p in e.value.problems if key in p.key]
    assert hits and all(p.fix for p in hits), e.value.format()
    return hits[0], path


def test_a_yaml_key_written_twice_names_both_lines(tmp_path):
    problem, path = _config_problem(tmp_path, "base_model: smollm2\nmetadata_path: d.jsonl\nlora_rank: 8\n"
                                    "lora_rank: 16\n", "c.yaml")
    assert problem.key == f"{path}:4" and "`lora_rank` appears twice (first on line 3)" in problem.message
    from loraforge.config import load_config  # a merge key may be overridden: that is what merging is for

    path.write_text("defaults: &d\n  lora_rank: 8\nbase_model: smollm2\nmetadata_path: d.jsonl\n")
    with pytest.raises(ConfigError, match="defaults"):  # (an unknown key; not a duplicate)
        load_config(path)


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    bomb = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(8))
    start = time.monotonic()
    problem, _ = _config_problem(tmp_path, "base_model: smollm2\nmetadata_path: d.jsonl\n" + bomb
                                 + "target_modules: *i\n", "target_modules")
    assert time.monotonic() - start < 10 and len(problem.format()) < 2000  # 9^9 strings: repr never built


@pytest.mark.parametrize("key,value,words", [
    ("lora_rank", True, "must be a number, not true/false"),
    ("learning_rate", True, "must be a number, not true/false"),
    ("use_dora", "yes", "must be true or false"),
    ("output_dir", "$HOME/runs/x", "environment variable `$HOME`"),
    ("output_dir", "", "is empty"),
    ("max_steps", 10**30, "is too large"),
    ("dataloader_num_workers", 10**6, "at most 64"),
    ("system_prompt", "hi \ud800", "lone surrogate"),
])
def test_values_pydantic_would_coerce_are_refused(key, value, words):
    from loraforge.config import config_from_dict

    with pytest.raises(ConfigError) as e:
        config_from_dict({"base_model": "smollm2", "metadata_path": "d.jsonl", key: value})
    [problem] = [p for p in e.value.problems if p.key == key]
    assert words in problem.message and problem.fix, e.value.format()


def test_a_home_relative_path_is_expanded():
    from pathlib import Path

    from loraforge.config import config_from_dict

    cfg = config_from_dict({"base_model": "smollm2", "metadata_path": "~/d.jsonl", "output_dir": "~/runs/x"})
    assert cfg.output_dir == Path.home() / "runs/x" and cfg.metadata_path == Path.home() / "d.jsonl"


def test_server_config_duplicate_key_gbk_and_bool_port(tmp_path):
    from loraforge.serve.config import load_server_config

    path = tmp_path / "serve.yaml"
    for content, words in ((b"port: 0\nport: 1\n", "serve.yaml:2"), ("host: 本地\n".encode("gbk"), "not UTF-8"),
                           (b"port: true\n", "must be a number, not true/false"),
                           (b"max_concurrency: 0\n", "(the default)")):
        path.write_bytes(content)
        with pytest.raises(ConfigError) as e:
            load_server_config(path)
        assert words in e.value.format() and all(p.fix for p in e.value.problems), e.value.format()


# ---------------------------------------------------------------------------------------------- command line


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    from loraforge import cli

    monkeypatch.setattr(sys, "argv", ["loraforge", *map(str, args)])
    with pytest.raises(SystemExit) as done:
        cli.main()
    return done.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args,words", [
    (["validate", "c.yaml", "--set", "lora_rank=[8"], "the value of `lora_rank` is not valid YAML"),
    (["validate", "c.yaml", "--set", "=8"], "--set: expects key=value"),
    (["validate", "c.yaml", "--set"], "fix: see `loraforge COMMAND --help`"),
    # a missing base would fail later and differently: these must be refused before any model loads
    (["generate", "--prompt", "hi", "--base", "/nonexistent", "--max-new-tokens", "0"], "max_new_tokens"),
    (["generate", "--prompt", "hi", "--base", "/nonexistent", "--temperature", "nan"], "temperature"),
    (["generate", "--prompt", "hi\udcff", "--base", "/nonexistent"], "--prompt: is not valid UTF-8 text"),
    (["generate", "--prompt", "hi", "--base", "/nonexistent", "--adapter", "a=/x", "--use", "b"], "--use"),
    (["chat", "--base", "/nonexistent", "--max-new-tokens", "-1"], "max_new_tokens"),
])
def test_cli_misuse_is_exit_2_with_a_fix_before_any_work(monkeypatch, capsys, args, words):
    code, err = _cli(monkeypatch, capsys, *args)
    assert code == 2 and words in err and "fix" in err and "Traceback" not in err, err


def test_merge_refuses_a_file_as_out_before_reading_the_run(monkeypatch, capsys, tmp_path):
    out = tmp_path / "model.bin"
    out.write_bytes(b"x")
    code, err = _cli(monkeypatch, capsys, "merge", tmp_path / "no-run", "--out", out)
    assert code == 2 and "--out: exists and is a file" in err and out.read_bytes() == b"x", err


def test_layer_indices_the_model_lacks_are_refused_by_validate(tiny_llama, tmp_path):
    from loraforge.config import config_from_dict
    from loraforge.preflight import run_preflight

    data = tmp_path / "d.jsonl"
    data.write_text(GOOD + "\n")
    cfg = config_from_dict({"base_model": str(tiny_llama), "metadata_path": str(data), "layers_to_transform": [0, 9],
                            "output_dir": str(tmp_path / "out")})
    with pytest.raises(LoraforgeError) as e:
        run_preflight(cfg, echo=lambda _m: None)
    [problem] = [p for p in e.value.problems if p.key == "layers_to_transform"]
    assert "layer index 9 does not exist" in problem.message and "the model has 2 layers" in problem.allowed
