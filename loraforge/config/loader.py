"""YAML → validated RunConfig, with every mistake collected into one ConfigError."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import ValidationError

from loraforge.config.image import IMAGE_METHODS
from loraforge.config.methods import METHOD_OPTIONS, key_owners
from loraforge.config.schema import KEY_ALIASES, RunConfig, TaskType, parse_task_type, task_type_names
from loraforge.config.values import value_problems
from loraforge.config.yaml_io import load_yaml_mapping
from loraforge.errors import ConfigError, Problem, suggestion


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Read a YAML file (plus `key=value` overrides) into a validated RunConfig.

    Raises:
        ConfigError: with every problem found — unknown keys, wrong types, out-of-range and enum values,
            cross-field conflicts — each naming the key, the value, what is allowed and the fix.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a config file" if path.is_dir() else "config file not found"
        raise ConfigError([Problem("config", what, value=str(path), allowed="a YAML file",
                                   fix="name the YAML file itself" if path.is_dir()
                                   else "check the path (relative paths start from the current directory)")])
    raw = load_yaml_mapping(path)
    raw = {**raw, **dict(overrides or {})}
    return config_from_dict(raw)


def config_from_dict(raw: Mapping[str, Any]) -> RunConfig:
    """Validate a plain dict (already parsed YAML) into a RunConfig; see `load_config`."""
    data, problems = _apply_aliases(raw)
    data, value_issues = value_problems(data, RunConfig.model_fields)
    if isinstance(data.get("image"), Mapping):
        from loraforge.config.image import ImageOptions

        data["image"], image_issues = value_problems(data["image"], ImageOptions.model_fields, "image.")
        value_issues += image_issues
    problems += value_issues
    problems += _cross_field(data)
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        ours = {p.key for p in value_issues}
        problems = [p for p in _pydantic_problems(e, data) if p.key not in ours] + problems
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    if cfg.learning_rate is None:
        cfg.learning_rate = METHOD_OPTIONS[cfg.method].default_learning_rate
    return cfg


def dump_config(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as plain YAML-able data (every default filled in)."""
    data = cfg.model_dump(mode="json")
    data["task_type"] = cfg.task_type.value
    return data


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(dump_config(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")


def _apply_aliases(raw: Mapping[str, Any]) -> tuple[dict[str, Any], list[Problem]]:
    data: dict[str, Any] = {}
    problems: list[Problem] = []
    spelled: dict[str, str] = {}  # canonical key -> how the user spelled it
    for key, value in raw.items():
        canonical = KEY_ALIASES.get(str(key), str(key))
        if canonical in data:
            first = spelled[canonical]
            problems.append(Problem(str(key), f"sets `{canonical}` a second time (already set by `{first}`)",
                                    value=value, allowed=f"one of `{first}`, `{key}`",
                                    fix=f"keep only one of `{first}` and `{key}`"))
            continue
        data[canonical] = value
        spelled[canonical] = str(key)
    return data, problems


def _pydantic_problems(err: ValidationError, data: Mapping[str, Any]) -> list[Problem]:
    """Turn pydantic's errors into Problems with key, value, what is allowed and a fix.

    A Union field reports one error per member (`target_modules` is a list *or* a string): those are merged
    into one problem per key so the user sees each mistake once.
    """
    problems: dict[str, Problem] = {}
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        # Union members add their type name to the location (`target_modules.list[str]`); drop it.
        loc = [p for p in loc if not any(c in p for c in "[]") and p not in _TYPE_LOC_NAMES]
        key = ".".join(loc) or "config"
        if key in problems:
            continue
        value = e.get("input")
        field, section_fields = _field_at(loc)
        if e["type"] == "extra_forbidden":
            names = section_fields + (list(KEY_ALIASES) if len(loc) == 1 else [])
            hint = suggestion(loc[-1], names)
            problems[key] = Problem(key, "unknown key", value=value,
                                    allowed="see `loraforge config-help` for every key",
                                    fix=hint or f"remove `{loc[-1]}`")
            continue
        if loc == ["method"]:
            names = list(METHOD_OPTIONS)
            problems[key] = Problem(key, "is not one of the allowed values", value=value, allowed=", ".join(names),
                                    fix=(suggestion(value, names) if isinstance(value, str) else None) or f"set `method: {names[0]}`")
            continue
        if loc == ["task_type"]:
            problems[key] = Problem(key, "unknown task type", value=value, allowed=", ".join(task_type_names()),
                                    fix=(suggestion(value, task_type_names()) if isinstance(value, str) else None) or "set `task_type: CAUSAL_LM` "
                                    "(text generation with a decoder-only model)")
            continue
        problems[key] = _value_problem(e, key, value, field)
    return list(problems.values())


_TYPE_LOC_NAMES = ("str", "int", "float", "bool", "function-after", "literal", "none", "path", "lax-or-strict",
                   "json-or-python", "function-wrap", "function-before", "is-instance")
_RANGE_WORDS = {"gt": ("greater than", ">"), "ge": ("at least", ">="), "lt": ("less than", "<"), "le": ("at most", "<=")}


def _field_at(loc: list[str]):
    """(FieldInfo or None, names of the fields in the section that holds it) for a pydantic error location."""
    from loraforge.config.image import ImageOptions

    if len(loc) >= 2 and loc[0] == "image":
        fields = ImageOptions.model_fields
        return fields.get(loc[1]), list(fields)
    fields = RunConfig.model_fields
    return (fields.get(loc[0]) if loc else None), list(fields)


def _value_problem(e: dict, key: str, value: Any, field) -> Problem:
    """One wrong value: wrong type, out of range or not one of the allowed choices."""
    ctx = e.get("ctx") or {}
    kind = e["type"]
    leaf = key.split(".")[-1]
    example = _example(field)
    if kind == "literal_error":
        choices = [c.strip().strip("'\"") for c in re.split(r",| or ", str(ctx.get("expected", ""))) if c.strip()]
        return Problem(key, "is not one of the allowed values", value=value, allowed=", ".join(choices),
                       fix=(suggestion(value, choices) if isinstance(value, str) else None) or f"set `{leaf}: {choices[0]}`" if choices else None)
    bounds = [(k, ctx[k]) for k in ("gt", "ge", "lt", "le") if k in ctx]
    if bounds:
        words = " and ".join(f"{_RANGE_WORDS[k][0]} {_num(v)}" for k, v in bounds)
        # `allowed` shows the field's whole range (dropout: >= 0 and < 1), not only the bound that failed.
        full = _field_bounds(field) or bounds
        allowed = " and ".join(f"{_RANGE_WORDS[k][1]} {_num(v)}" for k, v in full)
        return Problem(key, f"must be {words}", value=value, allowed=allowed,
                       fix=f"set e.g. `{leaf}: {example}`" if example is not None else f"use a value {allowed}")
    if kind == "missing":
        return Problem(key, "is required", allowed=_describe_type(field), fix=f"add `{leaf}:`")
    if kind == "value_error":  # a field validator's own message says what is wrong better than a type name
        return Problem(key, str(ctx.get("error") or e["msg"]).removeprefix("Value error, "), value=value,
                       allowed=_describe_type(field))
    described = _describe_type(field)
    return Problem(key, f"must be {described}" if described else e["msg"], value=value, allowed=described,
                   fix=f"write e.g. `{leaf}: {example}`" if example is not None else None)


def _field_bounds(field) -> list[tuple[str, Any]]:
    """[(gt|ge|lt|le, bound)] declared on a field (pydantic keeps them as annotated_types metadata)."""
    out = []
    for meta in getattr(field, "metadata", []) or []:
        for k in ("gt", "ge", "lt", "le"):
            v = getattr(meta, k, None)
            if v is not None:
                out.append((k, v))
    return out


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _describe_type(field) -> str | None:
    """Plain words for a field's type: `an integer`, `a list of strings, a string or null`…"""
    import typing
    from enum import Enum

    if field is None:
        return None

    def words(tp: Any) -> str:
        origin = typing.get_origin(tp)
        if origin is typing.Union or type(tp).__name__ == "UnionType":
            parts = [words(a) for a in typing.get_args(tp)]
            return ", ".join(parts[:-1]) + " or " + parts[-1] if len(parts) > 1 else parts[0]
        if origin is typing.Literal:
            return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
        if origin in (list, tuple):
            inner = typing.get_args(tp)
            return "a list of " + (_PLURAL.get(inner[0], "values") if inner else "values")
        if isinstance(tp, type) and hasattr(tp, "model_fields"):
            return "a mapping of " + ", ".join(list(tp.model_fields)[:4]) + ", …"
        if isinstance(tp, type) and issubclass(tp, Enum):
            return "one of " + ", ".join(str(m.value) for m in tp)
        return _SINGULAR.get(tp, getattr(tp, "__name__", str(tp)))

    return words(field.annotation)


_SINGULAR: dict[Any, str] = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
                             Path: "a file or folder path", type(None): "null", dict: "a mapping"}
_PLURAL: dict[Any, str] = {int: "integers", float: "numbers", str: "strings", Path: "paths"}


def _example(field) -> Any:
    """A value that would be accepted, for the fix: the field's default, else a sample of its type."""
    from enum import Enum

    if field is None:
        return None
    if field.description and field.description.startswith("Peak learning rate"):
        return "2.0e-4"  # the LoRA default; 1.0 (a sample number) would be a harmful suggestion
    default = field.default
    if isinstance(default, Enum):
        return default.value
    if default is not None and not callable(default) and type(default).__name__ != "PydanticUndefinedType":
        if isinstance(default, (list, tuple)):
            return "[" + ", ".join(str(x) for x in default) + "]"
        if isinstance(default, bool):
            return str(default).lower()
        return default
    text = _describe_type(field) or ""
    for word, sample in (("a list of strings", "[q_proj, v_proj]"), ("a list of integers", "[0, 1]"),
                         ("an integer", 1), ("a number", 1.0), ("path", "path/to/file"), ("a string", '"..."')):
        if word in text:
            return sample
    return None


def _cross_field(d: Mapping[str, Any]) -> list[Problem]:
    """Conflicts between fields, checked on the raw values (so they are reported with type errors too).

    Each rule names the key to change, both values in conflict, what is allowed and the fix.
    """
    problems: list[Problem] = []
    method = d.get("method", "lora")
    try:
        task = parse_task_type(d.get("task_type", "CAUSAL_LM"))
    except ValueError:
        task = None
    options = METHOD_OPTIONS.get(method) if isinstance(method, str) else None
    if options is not None:
        problems += _key_ownership(d, method)
        problems += options.rules(d)
    if d.get("warmup_steps") and d.get("warmup_ratio"):
        problems.append(Problem("warmup_ratio", f"warmup_steps ({d['warmup_steps']}) and warmup_ratio are both set",
                                value=d["warmup_ratio"], allowed="one of warmup_steps, warmup_ratio",
                                fix="keep one of them"))
    max_steps, warmup = d.get("max_steps"), d.get("warmup_steps")
    if _is_int(max_steps) and _is_int(warmup) and max_steps > 0 and warmup >= max_steps:
        problems.append(Problem("warmup_steps", f"warmup does not end before training does (max_steps is {max_steps})",
                                value=warmup, allowed=f"< max_steps ({max_steps})",
                                fix=f"set e.g. `warmup_steps: {max(max_steps // 10, 0)}` or `warmup_ratio: 0.1`"))
    has_val = bool(d.get("val_file")) or bool(d.get("val_size"))
    if d.get("val_file") and d.get("val_size"):
        problems.append(Problem("val_size", "val_size and val_file are both set", value=d["val_size"],
                                allowed="one of val_size, val_file",
                                fix="hold out part of the training data (val_size) or give a file (val_file), not both"))
    for key in ("eval_steps", "early_stopping_patience", "keep_best_checkpoint", "eval_generation_metric"):
        if d.get(key) and not has_val:
            problems.append(Problem(key, "needs a validation set, but neither val_size nor val_file is set",
                                    value=d[key], allowed="val_size > 0 or val_file",
                                    fix="set `val_size: 0.1` or `val_file: path/to/val.jsonl`"))
    if d.get("resume_from_checkpoint") and d.get("init_adapter"):
        problems.append(Problem("init_adapter", "resume_from_checkpoint and init_adapter are both set", value=d["init_adapter"],
                                allowed="one of resume_from_checkpoint, init_adapter",
                                fix="resume_from_checkpoint continues a run exactly; init_adapter starts a new run from an adapter — pick one"))
    if d.get("resume_from_checkpoint") and d.get("overwrite_output_dir") is True:
        problems.append(Problem("overwrite_output_dir", "would delete the run that resume_from_checkpoint continues",
                                value=True, allowed="false when resuming",
                                fix="remove `overwrite_output_dir` (or remove resume_from_checkpoint to start over)"))
    if isinstance(d.get("target_modules"), str) and d.get("layers_to_transform") is not None:
        problems.append(Problem("layers_to_transform", "cannot be combined with a regex `target_modules` (PEFT ignores "
                                "it then)", value=d["layers_to_transform"], allowed="target_modules as a list of names",
                                fix="write target_modules as a list, e.g. `[q_proj, v_proj]`, or put the layer "
                                    "numbers into the regex"))
    if d.get("batching") == "packed" and task is not None and task is not TaskType.CAUSAL_LM:
        problems.append(Problem("batching", f"packing is only for CAUSAL_LM, task_type is {task.value}", value="packed",
                                allowed="auto, padded, grouped", fix="use `batching: grouped`"))
    if d.get("batching") == "packed" and options is not None and options.packing_unsafe:
        problems.append(Problem("batching", f"packing is not safe with method `{method}`: {options.packing_unsafe}",
                                value="packed", allowed="auto, padded, grouped", fix="use `batching: grouped`"))
    if task is TaskType.TEXT_TO_IMAGE and method not in IMAGE_METHODS:
        problems.append(Problem("method", "text-to-image trains LoRA only", value=method,
                                allowed=", ".join(IMAGE_METHODS), fix=f"set `method: {IMAGE_METHODS[0]}`"))
    if d.get("image") is not None and task is not None and task is not TaskType.TEXT_TO_IMAGE:
        problems.append(Problem("image", f"image options are only used with task_type text-to-image (task_type is {task.value})",
                                allowed="task_type: text-to-image",
                                fix="remove the `image:` section or set `task_type: text-to-image`"))
    v = d.get("val_size")
    if isinstance(v, float) and 1 < v and not v.is_integer():
        problems.append(Problem("val_size", "must be a fraction below 1 or a whole count", value=v,
                                allowed="0 <= x < 1, or an integer >= 1", fix="e.g. `val_size: 0.1` or `val_size: 50`"))
    if not d.get("train_data_dir") and not d.get("metadata_path"):
        problems.append(Problem("metadata_path", "no training data given", allowed="a .jsonl or .json file",
                                fix="set `metadata_path: data/train.jsonl` (or `train_data_dir:` a folder of .jsonl files)"))
    return problems


def _key_ownership(d: Mapping[str, Any], method: str) -> list[Problem]:
    """A key that belongs to other methods is a mistake, not a no-op (the owners come from `METHOD_OPTIONS`).

    A key at its default value is harmless: a saved, resolved config lists every key.
    """
    problems: list[Problem] = []
    for key, methods in key_owners().items():
        if key in d and method not in methods and d[key] != RunConfig.model_fields[key].default:
            problems.append(Problem(key, f"only applies to method {' / '.join(methods)}, but method is `{method}`",
                                    value=d[key], allowed=f"method: {' | '.join(methods)}",
                                    fix=f"remove `{key}` or set `method: {methods[0]}`"))
    return problems


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
