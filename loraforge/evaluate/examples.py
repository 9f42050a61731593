"""Test examples: rows in the training formats, with optional `reference` lists of acceptable answers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loraforge.errors import DataError, Problem

REFERENCE_KEYS = ("reference", "expect")


@dataclass
class EvalExample:
    """One test question.

    Attributes:
        source: ``file:line`` of the row.
        messages: the conversation up to the answer (optional system, then user/assistant turns, ending with user).
        references: acceptable answers (generation metrics take the best match over them).
        answer: the answer scored by the loss: the row's own answer (`output` / last assistant turn), else the
            first reference.
    """

    source: str
    messages: list[dict[str, str]]
    references: list[str]
    answer: str

    @property
    def prompt(self) -> str:
        """The last user message (what the report shows as the question)."""
        return self.messages[-1]["content"]


def _parse_references(data: dict, where: str) -> tuple[list[str] | None, list[Problem]]:
    """The row's `reference` (or `expect`) as a list of strings, or None when it has neither."""
    present = [k for k in REFERENCE_KEYS if k in data]
    if not present:
        return None, []
    if len(present) > 1:
        return None, [Problem(where, "both `reference` and `expect` given", value=present,
                              fix="keep one of them (they mean the same: the acceptable answers)")]
    key = present[0]
    value = data[key]
    refs = [value] if isinstance(value, str) else value
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        return None, [Problem(where, f"`{key}` must be a string or a list of strings",
                              value=json.dumps(value, ensure_ascii=False)[:80],
                              allowed='"answer" or ["answer", "another acceptable answer"]')]
    if not refs or not all(r.strip() for r in refs):
        return None, [Problem(where, f"`{key}` has an empty answer", value=value,
                              fix="every acceptable answer must be non-empty text")]
    return refs, []


def _with_answer(data: dict, answer: str) -> dict:
    """A copy of a row that has no answer turn yet, completed with `answer` so the training-format parser
    (which requires one) accepts it. Malformed rows are returned unchanged for the parser to report."""
    data = dict(data)
    if "messages" in data and isinstance(data["messages"], list) and data["messages"]:
        last = data["messages"][-1]
        if isinstance(last, dict) and last.get("role") != "assistant":
            data["messages"] = data["messages"] + [{"role": "assistant", "content": answer}]
    elif "conversations" in data and isinstance(data["conversations"], list) and data["conversations"]:
        last = data["conversations"][-1]
        if isinstance(last, dict) and last.get("from") not in ("gpt", "assistant"):
            data["conversations"] = data["conversations"] + [{"from": "gpt", "value": answer}]
    elif "output" not in data:
        data["output"] = answer
    return data


def load_eval_examples(path: str | Path, system_prompt: str | None = None) -> list[EvalExample]:
    """Test examples in the training formats (alpaca instruction/output, chat messages, sharegpt).

    The reference is the row's answer (`output` / the last assistant turn). A row may instead (or also) give
    `reference` — a string or a list of acceptable answers (`expect` is accepted as a synonym); then the row
    may end with the user's turn.

    Raises:
        DataError: every bad row named by ``file:line``, or an empty file.
    """
    from loraforge.data.formats import Row, read_rows, row_to_messages

    problems: list[Problem] = []
    examples: list[EvalExample] = []
    for row in read_rows(path):
        refs, ref_problems = _parse_references(row.data, row.source)
        if ref_problems:
            problems.extend(ref_problems)
            continue
        data = {k: v for k, v in row.data.items() if k not in REFERENCE_KEYS}
        if refs is not None:
            data = _with_answer(data, refs[0])
        try:
            messages = row_to_messages(Row(row.source, data), system_prompt)
        except DataError as err:
            problems.extend(err.problems)
            continue
        answer = messages[-1]["content"]
        examples.append(EvalExample(source=row.source, messages=messages[:-1], references=refs or [answer],
                                    answer=answer))
    if problems:
        raise DataError(problems)
    if not examples:
        raise DataError([Problem(str(path), "no test examples found",
                                 fix='add rows like {"instruction": ..., "output": ...} or '
                                     '{"instruction": ..., "reference": [...]} (one JSON object per line)')])
    return examples
