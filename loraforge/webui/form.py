"""The config form, generated from the schema: every RunConfig field with its description, grouped by section,
and the methods a method-specific key applies to (the page shows those only for the chosen method).

Form values arrive as strings. `form_to_raw` turns them into the dict a YAML file would hold: text fields stay
text, everything else is read as YAML (`1e-4`, `[q_proj, v_proj]`, `null`), and only values that differ from the
default are kept, so the saved YAML is as short as one written by hand.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Mapping

import yaml

from loraforge.config import schema
from loraforge.config.methods import METHOD_OPTIONS, key_owners

SECTIONS = (("model", schema.ModelSection), ("method", schema.MethodSection), ("data", schema.DataSection),
            ("training", schema.TrainingSection), ("preference", schema.PreferenceSection),
            ("output", schema.OutputSection))
# The keys the page shows first in each section (the rest sit under "more").
PRIMARY = {"base_model", "task_type", "method", "lora_rank", "lora_alpha", "target_modules", "num_virtual_tokens",
           "freeze_trainable_layers", "metadata_path", "val_file", "template", "cutoff_len", "batch_size",
           "gradient_accumulation_steps", "epochs", "max_steps", "learning_rate", "logging_steps", "save_steps",
           "output_dir", "system_prompt", "val_size", "quant_bits", "eval_steps", "stage"}
# Fields whose path is resolved against the workspace for checks made inside the UI's process.
PATH_KEYS = ("train_data_dir", "metadata_path", "val_file", "output_dir", "init_adapter")


@dataclass
class FormField:
    name: str
    section: str
    kind: str  # bool | choice | text | yaml
    default: str
    description: str
    choices: list[str]
    methods: tuple[str, ...]  # empty: every method
    primary: bool


def form_fields() -> list[FormField]:
    owners = key_owners()
    out = []
    for section, cls in SECTIONS:
        own = {k: f for k, f in cls.model_fields.items()}
        for name, f in own.items():
            kind, choices = _kind(name, f.annotation)
            out.append(FormField(name, section, kind, _show(f.default), f.description or "", choices,
                                 owners.get(name, ()), name in PRIMARY))
    return out


def _kind(name: str, annotation: Any) -> tuple[str, list[str]]:
    if name == "method":
        return "choice", list(METHOD_OPTIONS)
    if annotation is bool:
        return "bool", []
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return "choice", [m.value for m in annotation]
    if typing.get_origin(annotation) is typing.Literal:
        return "choice", [str(a) for a in typing.get_args(annotation)]
    args = set(typing.get_args(annotation)) - {type(None)}
    if annotation in (str, Path) or (args and args <= {str, Path}):
        return "text", []
    return "yaml", []


def _show(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value)


def form_to_raw(values: Mapping[str, Any]) -> dict[str, Any]:
    """Form strings → the YAML dict (defaults left out). Unknown names are kept so validation names them."""
    fields = {f.name: f for f in form_fields()}
    raw: dict[str, Any] = {}
    for name, value in values.items():
        f = fields.get(name)
        text = value if isinstance(value, str) else _show(value)
        if f is not None and text.strip() == f.default.strip():
            continue
        if f is not None and f.kind == "text":
            if text.strip():
                raw[name] = text
            elif f.default:
                raw[name] = text  # an emptied required text field: validation says so
        elif text.strip() == "" and (f is None or f.default == ""):
            continue
        else:
            raw[name] = _yaml_value(text, f)
    return raw


def _yaml_value(text: str, f: FormField | None) -> Any:
    if f is not None and f.kind == "bool":
        return text.strip().lower() in ("true", "1", "on", "yes")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        return text  # validation reports the value with what is allowed
    if isinstance(value, str):  # YAML 1.1 reads `1e-4` as text; the config loader reads it as a number
        try:
            return float(value)
        except ValueError:
            pass
    return value


def raw_to_form(raw: Mapping[str, Any]) -> dict[str, str]:
    """A loaded YAML dict → form strings (keys the schema does not know are returned as they are)."""
    return {k: _show(v) for k, v in raw.items()}


def absolutize(raw: Mapping[str, Any], root: Path) -> dict[str, Any]:
    """Relative data/output paths resolved against the workspace (the training child runs with cwd = workspace)."""
    out = dict(raw)
    for key in PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and value.strip() and not Path(value).is_absolute():
            out[key] = str(root / value)
    base = out.get("base_model")
    if isinstance(base, str) and not Path(base).is_absolute() and (root / base).exists():
        out["base_model"] = str(root / base)
    return out


def cli_command(config_path: str, processes: int = 1) -> str:
    from loraforge.webui.launch import shown_command

    return shown_command("train", [config_path], processes)
