"""YAML → validated RunConfig, with every mistake collected into one ConfigError."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import ValidationError

from loraforge.config.schema import KEY_ALIASES, METHOD_DEFAULT_LR, RunConfig, TaskType, parse_task_type, task_type_names
from loraforge.errors import ConfigError, Problem, suggestion

LORA_KEYS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_bias", "target_modules", "init_lora_weights",
             "use_rslora", "use_dora", "layers_to_transform")
QUANT_KEYS = ("quant_bits", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype")
VIRTUAL_TOKEN_KEYS = ("num_virtual_tokens", "prefix_projection", "encoder_hidden_size",
                      "encoder_reparameterization_type", "prompt_tuning_init", "prompt_tuning_init_text")
FREEZE_KEYS = ("freeze_trainable_layers", "freeze_layer_indices", "freeze_trainable_modules",
               "freeze_train_embeddings", "freeze_train_lm_head")
# Which methods each group of keys belongs to: setting a key for another method is a mistake, not a no-op.
KEY_METHODS = {
    **{k: ("lora", "qlora") for k in LORA_KEYS},
    **{k: ("qlora",) for k in QUANT_KEYS},
    "num_virtual_tokens": ("prefix", "ptuning", "prompt"),
    "prefix_projection": ("prefix",),
    "encoder_hidden_size": ("prefix", "ptuning"),
    "encoder_reparameterization_type": ("ptuning",),
    "prompt_tuning_init": ("prompt",),
    "prompt_tuning_init_text": ("prompt",),
    **{k: ("freeze",) for k in FREEZE_KEYS},
}


def load_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Read a YAML file (plus `key=value` overrides) into a validated RunConfig.

    Raises:
        ConfigError: with every problem found — unknown keys, wrong types, out-of-range and enum values,
            cross-field conflicts — each naming the key, the value, what is allowed and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError([Problem(str(path), "config file not found", fix="check the path")])
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError([Problem(where, f"not valid YAML: {getattr(e, 'problem', e)}")]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([Problem(str(path), "the config must be a mapping of key: value", value=type(raw).__name__)])
    raw = {**raw, **dict(overrides or {})}
    return config_from_dict(raw)


def config_from_dict(raw: Mapping[str, Any]) -> RunConfig:
    """Validate a plain dict (already parsed YAML) into a RunConfig; see `load_config`."""
    data, problems = _apply_aliases(raw)
    problems += _cross_field(data)
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        problems = _pydantic_problems(e, data) + problems
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    if cfg.learning_rate is None:
        cfg.learning_rate = METHOD_DEFAULT_LR[cfg.method]
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
    for key, value in raw.items():
        canonical = KEY_ALIASES.get(str(key), str(key))
        if canonical in data:
            problems.append(Problem(str(key), f"sets `{canonical}` a second time", value=value,
                                    fix=f"keep only one of `{key}` and `{canonical}`"))
            continue
        data[canonical] = value
    return data, problems


def _pydantic_problems(err: ValidationError, data: Mapping[str, Any]) -> list[Problem]:
    fields = RunConfig.model_fields
    problems = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        # Union members add their type name to the location (`target_modules.list[str]`); drop it.
        loc = [p for p in loc if not any(c in p for c in "[]") and p not in ("str", "int", "float", "bool", "function-after")]
        key = ".".join(loc) or "config"
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            parent = RunConfig.model_fields["image"].annotation if loc[:1] == ["image"] else None
            names = list(fields) + list(KEY_ALIASES) if parent is None else _image_fields()
            problems.append(Problem(key, "unknown key", fix=suggestion(loc[-1], names) or "remove it (see `loraforge config-help`)"))
            continue
        allowed = _allowed(e, loc)
        msg = e["msg"]
        if loc == ["task_type"]:
            msg, allowed = "unknown task type", ", ".join(task_type_names())
            fix = suggestion(str(value), task_type_names())
        else:
            fix = suggestion(str(value), e.get("ctx", {}).get("expected", "").replace("'", "").split(", ")) \
                if e["type"] == "literal_error" else None
        problems.append(Problem(key, msg, value=value, allowed=allowed, fix=fix))
    return problems


def _image_fields() -> list[str]:
    from loraforge.config.image import ImageOptions

    return list(ImageOptions.model_fields)


def _allowed(e: dict, loc: list[str]) -> str | None:
    ctx = e.get("ctx") or {}
    if "expected" in ctx:
        return str(ctx["expected"])
    bounds = [f"{op} {ctx[k]}" for k, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")) if k in ctx]
    if bounds:
        return " and ".join(bounds)
    field = RunConfig.model_fields.get(loc[0]) if loc else None
    return str(field.annotation).replace("typing.", "") if field is not None and e["type"].endswith("_type") else None


def _cross_field(d: Mapping[str, Any]) -> list[Problem]:
    """Conflicts between fields, checked on the raw values (so they are reported with type errors too)."""
    problems: list[Problem] = []
    method = d.get("method", "lora")
    try:
        task = parse_task_type(d.get("task_type", "CAUSAL_LM"))
    except ValueError:
        task = None
    if method in ("lora", "qlora", "prefix", "ptuning", "prompt", "freeze", "full"):
        for key, methods in KEY_METHODS.items():
            if key in d and method not in methods:
                problems.append(Problem(key, f"only applies to method {' / '.join(methods)}, but method is `{method}`",
                                        value=d[key], fix=f"remove `{key}` or set `method: {methods[0]}`"))
    if d.get("warmup_steps") and d.get("warmup_ratio"):
        problems.append(Problem("warmup_ratio", "warmup_steps and warmup_ratio are both set", value=d["warmup_ratio"],
                                fix="keep one of them"))
    has_val = bool(d.get("val_file")) or bool(d.get("val_size"))
    if d.get("val_file") and d.get("val_size"):
        problems.append(Problem("val_size", "val_size and val_file are both set", value=d["val_size"],
                                fix="hold out part of the training data (val_size) or give a file (val_file), not both"))
    for key in ("eval_steps", "early_stopping_patience", "keep_best_checkpoint", "eval_generation_metric"):
        if d.get(key) and not has_val:
            problems.append(Problem(key, "needs a validation set", value=d[key],
                                    fix="set `val_size: 0.1` or `val_file: path/to/val.jsonl`"))
    if d.get("resume_from_checkpoint") and d.get("init_adapter"):
        problems.append(Problem("init_adapter", "resume_from_checkpoint and init_adapter are both set", value=d["init_adapter"],
                                fix="resume_from_checkpoint continues a run exactly; init_adapter starts a new run from an adapter — pick one"))
    if d.get("prompt_tuning_init") == "text" and not d.get("prompt_tuning_init_text"):
        problems.append(Problem("prompt_tuning_init_text", "is required when prompt_tuning_init is `text`",
                                fix="set prompt_tuning_init_text: \"Answer the medical question:\""))
    if d.get("batching") == "packed" and task is not None and task is not TaskType.CAUSAL_LM:
        problems.append(Problem("batching", f"packing is only for CAUSAL_LM, task_type is {task.value}", value="packed",
                                allowed="auto, padded, grouped", fix="use `batching: grouped`"))
    if task is TaskType.TEXT_TO_IMAGE and method != "lora":
        problems.append(Problem("method", "text-to-image trains LoRA only", value=method, allowed="lora", fix="set `method: lora`"))
    if d.get("image") is not None and task is not None and task is not TaskType.TEXT_TO_IMAGE:
        problems.append(Problem("image", f"image options are only used with task_type text-to-image (task_type is {task.value})",
                                fix="remove the `image:` section or set `task_type: text-to-image`"))
    v = d.get("val_size")
    if isinstance(v, float) and 1 < v and not v.is_integer():
        problems.append(Problem("val_size", "must be a fraction below 1 or a whole count", value=v, allowed="0 <= x < 1, or an integer >= 1"))
    if not d.get("train_data_dir") and not d.get("metadata_path"):
        problems.append(Problem("metadata_path", "no training data given",
                                fix="set `metadata_path: data/train.jsonl` (or `train_data_dir:` a folder of .jsonl files)"))
    return problems
