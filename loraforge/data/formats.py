"""Stage 1 of the data pipeline: files → rows → chat messages (pure, no tokenizer).

Three row shapes are accepted, in .jsonl, .json (an array of objects) or .csv files:

* alpaca (the article's format): ``{"instruction", "input"?, "output", "system"?, "history"?}`` where
  ``history`` is a list of ``[user, assistant]`` pairs that came before;
* chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``;
* sharegpt: ``{"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...], "system"?}``.

Every row becomes the same list of ``{"role", "content"}`` messages: an optional system message first, then
user and assistant alternating, ending with an assistant reply. `load_conversations` checks every row of every
file and raises one `DataError` that names each bad line as ``file:line``, so a user fixes the whole file in
one pass instead of one crash per run.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from loraforge.errors import DataError, Problem, suggestion

DATA_SUFFIXES = (".jsonl", ".json", ".csv")
ROLES = ("system", "user", "assistant")
# ShareGPT speaker names (and a few common variants) → our roles.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
ALPACA_KEYS = ("instruction", "input", "output", "system", "history")
MAX_SHOWN_PROBLEMS = 20

Message = dict[str, str]


@dataclass
class Row:
    """One raw example and where it came from.

    Attributes:
        source: ``path:line`` (1-based line where the row starts; for a .csv file the line of its record).
        data: the parsed object.
    """

    source: str
    data: dict


# ---------------------------------------------------------------------------------------------- reading


def read_rows(path: str | Path) -> list[Row]:
    """All rows of one .jsonl / .json / .csv file.

    Raises:
        DataError: the file is missing, has an unsupported suffix, or has unparsable / non-object rows
            (every bad line is listed).
    """
    problems: list[Problem] = []
    rows = _read_rows(Path(path), problems)
    _raise_if(problems)
    return rows


def _read_rows(path: Path, problems: list[Problem]) -> list[Row]:
    """Rows of one file; unreadable rows are added to `problems` instead of raising."""
    if not path.is_file():
        problems.append(Problem(str(path), "data file not found", fix="check the path (relative paths are resolved "
                                "from the directory you run loraforge in)"))
        return []
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        problems.append(Problem(str(path), "unsupported data file type", value=path.suffix,
                                allowed=", ".join(DATA_SUFFIXES), fix="convert it to .jsonl"))
        return []
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a BOM written by Windows editors
    except UnicodeDecodeError as e:
        problems.append(Problem(str(path), f"not UTF-8 text ({e.reason} at byte {e.start})",
                                fix="save the file as UTF-8"))
        return []
    if suffix == ".jsonl":
        return _read_jsonl(path, text, problems)
    if suffix == ".csv":
        return _read_csv(path, text, problems)
    # A .json file is usually an array, but people also save JSON Lines under .json.
    if text.lstrip().startswith("[") or not text.strip():
        return _read_json_array(path, text, problems)
    if text.lstrip().startswith("{") and "\n" in text.strip():
        whole = _one_object(path, text, problems)
        if whole is not None:
            return whole
    return _read_jsonl(path, text, problems)


def _one_object(path: Path, text: str, problems: list[Problem]) -> list[Row] | None:
    """A .json file that is one (pretty-printed) object: that row, or a problem naming the key that holds the rows
    (`{"data": [...]}`); None when the text is not one JSON document (JSON Lines under .json)."""
    try:
        obj = _DECODER.decode(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    leading = text[:len(text) - len(text.lstrip())]
    start = f"{path}:{leading.count(chr(10)) + 1}"
    if any(k in obj for k in ("instruction", "output", "messages", "conversations", "prompt", "chosen", "text")):
        bad = _row_problem(start, obj)
        if bad is not None:
            problems.append(bad)
            return []
        return [Row(start, obj)]
    lists = [k for k, v in obj.items() if isinstance(v, list)]
    problems.append(Problem(start, "a .json data file must hold an array of rows, this one holds an object"
                            + (f" whose rows seem to be under `{lists[0]}`" if lists else ""),
                            value=list(obj)[:5], allowed='[{"instruction": ..., "output": ...}, ...]',
                            fix=f"save the array under `{lists[0]}` as the file's whole content" if lists
                            else "wrap the rows in [ ... ] or save them as .jsonl"))
    return []


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    """`object_pairs_hook`: json keeps the last of two equal keys silently; a data row must not have them."""
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates)


def _bad_text(obj: Any, at: str = "") -> tuple[str, str] | None:
    """(key path, what is wrong) of the first string, key or value, that is no text: one holding a lone UTF-16
    surrogate (`"\\ud800"`: valid JSON, not valid Unicode) or a NUL character (a binary or UTF-16 file read as text)."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return at or "the row", "surrogate"
        return (at or "the row", "nul") if "\x00" in obj else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        path = f"{at}.{k}" if at else str(k)
        found = (_bad_text(k, f"key {path!r}") if isinstance(k, str) else None) or _bad_text(v, path)
        if found:
            return found
    return None


def _row_problem(where: str, obj: Any) -> Problem | None:
    try:
        bad = _bad_text(obj)
    except RecursionError:  # json parsed it, but only just: no training row nests this deep
        return Problem(where, "JSON nested too deeply to check", fix="flatten the row: a training row holds strings "
                       "and short lists")
    if bad is None:
        return None
    at, kind = bad
    if kind == "surrogate":
        return Problem(where, f"`{at}` holds a lone surrogate escape (like \\ud800): not valid Unicode text",
                       fix="remove it or replace it with the character meant (a surrogate pair, or the real character)")
    return Problem(where, f"`{at}` holds a NUL character (\\u0000): not text (often a binary or UTF-16 file, or a "
                   "broken export)", fix="remove the NUL characters (e.g. `tr -d '\\000'`) or re-export the data as UTF-8")


def _decode_problem(where: str, err: Exception, line: str) -> Problem:
    """A row json cannot turn into a value: a syntax error, nesting deeper than Python's recursion allows, or an
    integer too long to convert."""
    if isinstance(err, json.JSONDecodeError):
        return Problem(where, f"invalid JSON: {err.msg} at column {err.colno}", value=_clip(line),
                       fix="fix that line: one complete JSON object, keys and strings in double quotes")
    if isinstance(err, RecursionError):
        return Problem(where, "JSON nested too deeply to read (about a thousand [ or { inside each other)",
                       value=_clip(line), fix="flatten the row: a training row holds strings and short lists")
    return Problem(where, f"unreadable JSON value: {err}", value=_clip(line),
                   fix="write long numbers as strings, or remove the field")


def _json_lines(text: str):
    """(line number, line) of JSON Lines text. Split on \\n only: `str.splitlines` also splits on U+2028, form
    feed, NEL…, which may stand unescaped inside a JSON string."""
    for lineno, line in enumerate(text.split("\n"), start=1):
        yield lineno, line.removesuffix("\r")


def _read_jsonl(path: Path, text: str, problems: list[Problem]) -> list[Row]:
    rows = []
    for lineno, line in _json_lines(text):
        if not line.strip():
            continue  # blank lines (often a trailing newline) are not rows
        where = f"{path}:{lineno}"
        try:
            obj = _DECODER.decode(line)
        except _DuplicateKey as e:
            problems.append(Problem(where, f"key `{e}` appears twice in one object (JSON would keep only the last)",
                                    value=_clip(line), fix=f"keep one `{e}`"))
            continue
        except (ValueError, RecursionError) as e:
            problems.append(_decode_problem(where, e, line))
            continue
        if (bad := _row_problem(where, obj)) is not None:
            problems.append(bad)
            continue
        if isinstance(obj, list) and obj and all(isinstance(o, dict) for o in obj) and path.suffix.lower() == ".jsonl":
            problems.append(Problem(where, "row is a JSON array, not an object: this looks like a JSON array file "
                                    "saved as .jsonl", value=_clip(line), allowed="one JSON object per line",
                                    fix="rename the file to .json (an array of objects), or write one object per line"))
            continue
        if not isinstance(obj, dict):
            problems.append(Problem(where, "row is not a JSON object", value=_clip(line),
                                    allowed='{"instruction": ..., "output": ...} or {"messages": [...]}',
                                    fix="write one JSON object per line"))
            continue
        rows.append(Row(where, obj))
    return rows


def _read_json_array(path: Path, text: str, problems: list[Problem]) -> list[Row]:
    """Parse `[obj, obj, ...]` element by element so each row knows the line it starts on."""
    decoder = _DECODER
    rows: list[Row] = []
    pos, line, counted_to = 0, 1, 0

    def line_at(i: int) -> int:  # incremental newline count: O(file) overall
        nonlocal line, counted_to
        line += text.count("\n", counted_to, i)
        counted_to = i
        return line

    def skip_ws(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    pos = skip_ws(pos)
    if pos == len(text):
        return rows  # an empty file has no rows; `load_conversations` reports "no examples"
    if text[pos] != "[":
        problems.append(Problem(f"{path}:{line_at(pos)}", "a .json data file must hold an array of objects",
                                value=_clip(text[pos:pos + 40]), fix="wrap the rows in [ ... ] or save them as .jsonl"))
        return rows
    pos = skip_ws(pos + 1)
    index = 0
    if pos < len(text) and text[pos] == "]":
        return rows
    while pos < len(text):
        where = f"{path}:{line_at(pos)}"
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            # The rest of the array cannot be located reliably after a syntax error: report it and stop.
            problems.append(Problem(f"{path}:{e.lineno}", f"invalid JSON: {e.msg} at column {e.colno} "
                                    f"(array element [{index}]); rows after it were not read",
                                    fix="check the brackets, commas and quotes on that line"))
            return rows
        except _DuplicateKey as e:
            problems.append(Problem(where, f"key `{e}` appears twice in array element [{index}] (JSON would keep only "
                                    "the last); rows after it were not read", fix=f"keep one `{e}`"))
            return rows
        except (ValueError, RecursionError) as e:
            bad = _decode_problem(where, e, text[pos:pos + 80])
            problems.append(Problem(bad.key, f"{bad.message} (array element [{index}]); rows after it were not read",
                                    fix=bad.fix))
            return rows
        if isinstance(obj, dict) and (bad := _row_problem(where, obj)) is not None:
            problems.append(bad)
        elif isinstance(obj, dict):
            rows.append(Row(where, obj))
        else:
            problems.append(Problem(where, f"array element [{index}] is not a JSON object", value=_clip(json.dumps(obj)),
                                    allowed='{"instruction": ..., "output": ...} or {"messages": [...]}',
                                    fix="make every element of the array an object"))
        index += 1
        pos = skip_ws(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_ws(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            if skip_ws(pos + 1) != len(text):
                problems.append(Problem(f"{path}:{line_at(skip_ws(pos + 1))}", "unexpected text after the closing `]`",
                                        fix="remove what follows the array, or put it inside it"))
            return rows
        problems.append(Problem(f"{path}:{line_at(min(pos, len(text)))}",
                                f"expected `,` or `]` after array element [{index - 1}]",
                                fix="separate the objects with commas and close the array with `]`"))
        return rows
    problems.append(Problem(f"{path}:{line_at(len(text))}", "the JSON array is not closed with `]`",
                            fix="add the closing `]` (the file may have been cut short)"))
    return rows


def _read_csv(path: Path, text: str, problems: list[Problem]) -> list[Row]:
    """A header row, then one example per record (columns `instruction,input,output` or `system` too)."""
    reader = csv.DictReader(io.StringIO(text, newline=""))  # csv finds records itself (quoted newlines)
    rows = []
    start = 2  # line of the first record (after the header)
    try:
        for record in reader:
            where = f"{path}:{start}"
            start = reader.line_num + 1  # a quoted field may span lines: the next record starts after this one
            if None in record:  # more fields than header columns
                problems.append(Problem(where, "more fields than header columns", value=_clip(",".join(record[None])),
                                        fix="quote fields that hold commas: \"a, b\""))
                continue
            row = {k: v for k, v in record.items() if v is not None and k is not None}
            if (bad := _row_problem(where, row)) is not None:
                problems.append(bad)
                continue
            rows.append(Row(where, row))
    except csv.Error as e:
        problems.append(Problem(f"{path}:{reader.line_num}", f"invalid CSV: {e}", fix="check the quotes on that line"))
    return rows


# ---------------------------------------------------------------------------------------------- files


def resolve_train_files(cfg: Any) -> list[Path]:
    """The training files a config names: `metadata_path`, else every .jsonl/.json file in `train_data_dir`.

    Raises:
        DataError: neither is set, the file or directory is missing, or the directory holds no data file.
    """
    if cfg.metadata_path is not None:
        path = Path(cfg.metadata_path)
        if not path.is_file():
            fix = "point metadata_path at an existing .jsonl / .json / .csv file"
            if path.is_dir():
                fix = "metadata_path is a directory: set `train_data_dir` to it instead, or name a file inside it"
            raise DataError([Problem("metadata_path", "training data file not found", value=str(path), fix=fix)])
        if path.suffix.lower() not in DATA_SUFFIXES:
            raise DataError([Problem("metadata_path", "unsupported data file type", value=str(path),
                                     allowed=", ".join(DATA_SUFFIXES), fix="convert it to .jsonl")])
        return [path]
    if cfg.train_data_dir is None:
        raise DataError([Problem("metadata_path", "no training data given",
                                 fix="set `metadata_path: path/to/train.jsonl` (or `train_data_dir: a/folder`)")])
    folder = Path(cfg.train_data_dir)
    if not folder.is_dir():
        raise DataError([Problem("train_data_dir", "training data directory not found", value=str(folder),
                                 fix="point train_data_dir at an existing folder of .jsonl / .json files")])
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".jsonl", ".json"))
    if not files:
        raise DataError([Problem("train_data_dir", "no .jsonl or .json file in the training data directory",
                                 value=str(folder), fix="add data files there or set `metadata_path`")])
    return files


# ---------------------------------------------------------------------------------------------- rows → messages


def row_to_messages(row: Row, system_prompt: str | None = None) -> list[Message]:
    """Normalize one row (alpaca, chat or sharegpt) to checked chat messages.

    Args:
        row: the raw row.
        system_prompt: added as the first message when the row has no system message of its own.

    Raises:
        DataError: the row has an unknown shape, missing or empty fields, or a wrong role order.
    """
    messages, problems = _row_to_messages(row, system_prompt)
    _raise_if(problems)
    return messages


def load_conversations(paths: Iterable[str | Path], system_prompt: str | None = None) -> list[tuple[str, list[Message]]]:
    """Read and check every row of every file: ``[(source, messages), ...]`` in file order.

    Raises:
        DataError: one error listing every bad line (the first 20, and the total), or "no examples".
    """
    problems: list[Problem] = []
    out: list[tuple[str, list[Message]]] = []
    paths = list(paths)
    for path in paths:
        for row in _read_rows(Path(path), problems):
            messages, row_problems = _row_to_messages(row, system_prompt)
            problems.extend(row_problems)
            if not row_problems:
                out.append((row.source, messages))
    if not problems and not out:
        problems.append(Problem(", ".join(str(p) for p in paths) or "data", "no examples found",
                                fix="add rows like {\"instruction\": ..., \"output\": ...} (one JSON object per line)"))
    _raise_if(problems)
    return out


def _row_to_messages(row: Row, system_prompt: str | None) -> tuple[list[Message], list[Problem]]:
    data, where = row.data, row.source
    shapes = [k for k in ("messages", "conversations") if k in data]
    shapes += ["instruction/output"] if "instruction" in data or "output" in data else []
    if len(shapes) > 1:  # one of them would be ignored without a word
        return [], [Problem(where, f"row mixes two formats ({' and '.join(f'`{s}`' for s in shapes)}): only one "
                            "would be used", value=list(data)[:8], fix="keep one of them in the row")]
    if "system" in data and data["system"] is not None and not isinstance(data["system"], str):
        return [], [Problem(where, "`system` must be a string", value=_clip(json.dumps(data["system"])),
                            allowed="a string", fix="write the system message as one string")]
    if "messages" in data:
        messages, problems = _chat_messages(data["messages"], where, "messages", "role", "content", None)
    elif "conversations" in data:
        messages, problems = _chat_messages(data["conversations"], where, "conversations", "from", "value",
                                            SHAREGPT_ROLES)
        if not problems and isinstance(data.get("system"), str) and data["system"].strip():
            if messages and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": data["system"]})
    elif "instruction" in data or "output" in data:
        messages, problems = _alpaca_messages(data, where)
    else:
        keys = list(data)
        hint = next((s for s in (suggestion(k, ("instruction", "output", "messages", "conversations")) for k in keys)
                     if s), None)
        return [], [Problem(where, "row has neither `instruction`/`output` nor `messages` (nor `conversations`)",
                            value=keys, allowed='{"instruction", "input"?, "output"} or {"messages": [{"role", '
                            '"content"}, ...]}', fix=hint)]
    if problems:
        return [], problems
    problems = check_messages(messages, where)
    if problems:
        return [], problems
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages, []


def _alpaca_messages(data: dict, where: str) -> tuple[list[Message], list[Problem]]:
    problems = []
    for key in ("instruction", "output"):
        if key not in data:
            problems.append(Problem(where, f"missing `{key}`", allowed='{"instruction", "input"?, "output"}',
                                    fix=f"add `{key}` to the row (or drop the row)"))
    for key in ("instruction", "output"):
        if key in data and data[key] is None:
            problems.append(Problem(where, f"`{key}` is null", allowed="a string",
                                    fix=f"write the {key} text, or drop the row (exported datasets often hold nulls)"))
    for key in ("instruction", "input", "output", "system"):
        if key in data and data[key] is not None and not isinstance(data[key], str):
            problems.append(Problem(where, f"`{key}` must be a string", value=_clip(json.dumps(data[key])),
                                    allowed="a string", fix=f"write `{key}` as one string (join a list of parts first)"))
    if problems:
        return [], problems
    instruction = data["instruction"]
    extra = data.get("input") or ""
    if not instruction.strip() and not extra.strip():
        problems.append(Problem(where, "empty `instruction` (and no `input`)", fix="write the question or task"))
    if not data["output"].strip():
        problems.append(Problem(where, "empty output", value=data["output"], fix="write the answer the model should learn"))
    unknown = [k for k in data if k not in ALPACA_KEYS]
    for key in unknown:
        hint = suggestion(key, ALPACA_KEYS)
        if hint:  # unknown keys are allowed (ids, tags…) unless they look like a typo of ours
            problems.append(Problem(where, f"unknown key `{key}`", allowed=", ".join(ALPACA_KEYS), fix=hint))
    messages: list[Message] = []
    if isinstance(data.get("system"), str) and data["system"].strip():
        messages.append({"role": "system", "content": data["system"]})
    history = data.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)
            for turn in history):
        problems.append(Problem(where, "`history` must be a list of [user, assistant] string pairs",
                                value=_clip(json.dumps(history, ensure_ascii=False)),
                                fix='write it as [["earlier question", "earlier answer"], ...] or drop it'))
        history = []
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    # The article's format: the optional `input` is the material the instruction refers to, after a blank line.
    prompt = f"{instruction}\n\n{extra}" if instruction.strip() and extra.strip() else (instruction if instruction.strip() else extra)
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": data["output"]}]
    return messages, problems


def _chat_messages(turns: Any, where: str, field: str, role_key: str, content_key: str,
                   role_names: dict[str, str] | None) -> tuple[list[Message], list[Problem]]:
    if not isinstance(turns, list) or not turns:
        return [], [Problem(where, f"`{field}` must be a non-empty list of turns", value=_clip(json.dumps(turns)),
                            allowed=f'[{{"{role_key}": ..., "{content_key}": ...}}, ...]',
                            fix=f"put the turns in a list: `{field}`: [{{...}}, {{...}}]")]
    allowed_roles = tuple(role_names) if role_names else ROLES
    messages: list[Message] = []
    problems: list[Problem] = []
    for i, turn in enumerate(turns):
        at = f"{field}[{i}]"
        if not isinstance(turn, dict):
            problems.append(Problem(where, f"{at} is not an object", value=_clip(json.dumps(turn)),
                                    allowed=f'{{"{role_key}": ..., "{content_key}": ...}}',
                                    fix=f"write each turn as an object with `{role_key}` and `{content_key}`"))
            continue
        role, content = turn.get(role_key), turn.get(content_key)
        if role not in allowed_roles:
            problems.append(Problem(where, f"{at} has unknown {role_key}", value=role, allowed=", ".join(allowed_roles),
                                    fix=(suggestion(role, allowed_roles) if isinstance(role, str) else None)
                                    or f"use one of {', '.join(allowed_roles)}"))
            continue
        if not isinstance(content, str):
            what = "is missing" if content_key not in turn else "must be a string"
            problems.append(Problem(where, f"{at}.{content_key} {what}",
                                    value=None if content is None else _clip(json.dumps(content)),
                                    allowed="a string", fix=f"write the turn's text as `{content_key}`: \"...\" "
                                    "(join a list of text parts first), or drop the row"))
            continue
        messages.append({"role": role_names[role] if role_names else role, "content": content})
    return messages, problems


def check_messages(messages: list[Message], where: str) -> list[Problem]:
    """The role order every template relies on: optional system, then user/assistant alternating, ending with
    a non-empty assistant reply."""
    allowed = "an optional system message first, then user and assistant alternating, ending with assistant"
    problems: list[Problem] = []
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    roles = [m["role"] for m in body]
    for i, role in enumerate(roles):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            at = i + (len(messages) - len(body))
            problems.append(Problem(where, f"wrong role order: messages[{at}] is `{role}`, expected `{expected}`",
                                    value=[m["role"] for m in messages], allowed=allowed,
                                    fix="merge consecutive turns of one speaker, or drop the row"))
            return problems
    if not roles or roles[-1] != "assistant":
        problems.append(Problem(where, "wrong role order: the conversation must end with an assistant reply",
                                value=[m["role"] for m in messages], allowed=allowed,
                                fix="add the assistant's answer as the last turn, or drop the row"))
        return problems
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            problems.append(Problem(where, f"empty output (messages[{i}] is an empty assistant reply)",
                                    fix="write the answer the model should learn"))
    return problems


# ---------------------------------------------------------------------------------------------- helpers


def _raise_if(problems: list[Problem]) -> None:
    if not problems:
        return
    shown = problems[:MAX_SHOWN_PROBLEMS]
    if len(problems) > len(shown):
        shown = shown + [Problem("data", f"... and {len(problems) - len(shown)} more problems "
                                 f"({len(problems)} in total); fix the ones above and run again")]
    raise DataError(shown, title=f"invalid data ({len(problems)} problem{'s' if len(problems) != 1 else ''} "
                    f"in total)" if len(problems) > MAX_SHOWN_PROBLEMS else None)


def _clip(text: str, n: int = 80) -> str:
    text = text.strip()
    return text if len(text) <= n else text[:n] + "…"
