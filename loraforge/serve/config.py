"""`loraforge serve` settings: one base model, named adapters, optional A/B routes, safety limits.

Loaded from YAML (`configs/serve-*.yaml`) or built from CLI flags. No torch import here.
Relative paths in a YAML file are relative to that file's folder; with `adapter_roots` set, adapter paths
are relative to the roots (and must stay inside them).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loraforge.errors import ConfigError, Problem, suggestion

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


class RouteTarget(BaseModel):
    """One arm of an A/B route."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    adapter: str = Field(description="A loaded adapter name, or `base`.")
    weight: float = Field(gt=0, description="Relative share of requests (weights need not sum to 1).")


class ServerConfig(BaseModel):
    """Everything `loraforge serve` needs."""

    # allow_inf_nan=False: `request_timeout_s: .inf` or `batch_window_ms: .inf` would hold requests forever
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    base_model: str = Field("smollm2", description="Built-in name, local HF model dir or .gguf file.")
    adapters: dict[str, str] = Field(default_factory=dict, description="Public model name -> adapter dir, loaded at start.")
    adapter_roots: list[Path] = Field(
        default_factory=list,
        description="If set, adapters (at start and through the admin API) must lie inside these folders.")
    routes: dict[str, list[RouteTarget]] = Field(
        default_factory=dict,
        description="A/B routes: public name -> weighted adapters, e.g. {medical: [{adapter: cardiology, weight: 0.9}, "
                    "{adapter: cardiology-v2, weight: 0.1}]}. The chosen adapter is reported in each response.")
    host: str = Field("127.0.0.1", description="Bind address. Loopback by default; set an api_key before binding 0.0.0.0.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port).")
    api_key: Union[str, None] = Field(None, description="If set, every /v1 and /admin request needs `Authorization: Bearer KEY`.")
    max_concurrency: int = Field(64, gt=0, description="Requests admitted at once; more get HTTP 429.")
    scheduling: Literal["batch", "lock"] = Field(
        "batch",
        description="batch: concurrent requests are generated together, each row with its own adapter (PEFT "
                    "adapter_names); lock: one request at a time. See docs/SERVING.md for the measurement.")
    max_batch_size: int = Field(16, gt=0, description="batch scheduling: most requests generated together.")
    batch_window_ms: float = Field(5.0, ge=0, le=60_000, description="batch scheduling: how long to wait for more requests to join a batch.")
    default_max_tokens: int = Field(256, gt=0, description="Completion length when a request gives no max_tokens.")
    max_tokens_limit: int = Field(2048, gt=0, description="Largest max_tokens a request may ask for.")
    default_temperature: float = Field(1.0, ge=0, le=2, description="Temperature when a request gives none (OpenAI's default is 1).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Base model dtype.")
    trust_remote_code: bool = Field(False, description="Run the model's own Python code.")
    route_seed: Union[int, None] = Field(None, description="Seed for A/B choices (reproducible routing in tests).")
    request_timeout_s: float = Field(120.0, gt=0, description="Most seconds one request may generate; the answer "
                                     "then ends with finish_reason `length`, so no request holds the model for long.")
    shutdown_timeout_s: float = Field(5.0, ge=0, description="On SIGTERM/Ctrl-C: how long running requests may finish "
                                      "before the server exits anyway.")

    @field_validator("adapters")
    @classmethod
    def _names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if name == "base" or not _NAME_RE.match(name):
                raise ValueError(f"invalid adapter name {name!r}: use 1-64 of A-Z a-z 0-9 . _ : - and not `base`")
        return v

    @model_validator(mode="after")
    def _routes(self) -> "ServerConfig":
        problems = route_problems({k: [t.adapter for t in v] for k, v in self.routes.items()}, list(self.adapters))
        if problems:
            raise ValueError("; ".join(problems))
        return self


def route_problems(routes: dict[str, list[str]], adapters: list[str]) -> list[str]:
    """What is wrong with A/B routes (route name -> adapter names), given the configured adapters."""
    known = {"base", *adapters}
    problems = []
    for route, targets in routes.items():
        if route in known:
            problems.append(f"route `{route}` has the same name as an adapter (or `base`)")
        elif not _NAME_RE.match(route):
            problems.append(f"invalid route name {route!r}")
        if not targets:
            problems.append(f"route `{route}` has no targets")
        for name in targets:
            if name not in known:
                hint = suggestion(name, known)
                problems.append(f"route `{route}` names unknown adapter `{name}`"
                                + (f" ({hint})" if hint else f"; known: {', '.join(sorted(known))}"))
    return problems


def _raw_route_problems(data: dict[str, Any]) -> list[str]:
    """Route checks on unvalidated input, so they are reported together with other key errors."""
    routes, adapters = data.get("routes"), data.get("adapters") or {}
    if not isinstance(routes, dict) or not isinstance(adapters, dict):
        return []
    simple = {str(k): [t.get("adapter") for t in v if isinstance(t, dict) and isinstance(t.get("adapter"), str)]
              for k, v in routes.items() if isinstance(v, list)}
    return route_problems(simple, [str(a) for a in adapters])


def server_config_from_dict(data: dict[str, Any], *, source: str = "<dict>", base_dir: Path | None = None) -> ServerConfig:
    """Validate a dict (all problems reported together). Relative paths resolve against `base_dir`.

    Raises:
        ConfigError: every invalid or unknown key, with the bad value and a did-you-mean.
    """
    data = dict(data)
    if base_dir is not None:
        roots = [str((base_dir / r) if not Path(str(r)).is_absolute() else r) for r in data.get("adapter_roots") or []]
        if roots:
            data["adapter_roots"] = roots
        elif isinstance(data.get("adapters"), dict):
            data["adapters"] = {k: str(base_dir / v) if isinstance(v, str) and not Path(v).is_absolute() else v
                                for k, v in data["adapters"].items()}
    from loraforge.config.values import value_problems

    # true/false where a number belongs, an unexpanded $VAR...: pydantic would accept these
    data, issues = value_problems(data, ServerConfig.model_fields)
    problems = [Problem(f"{source}: {p.key}", p.message, p.value, p.allowed, p.fix) for p in issues]
    try:
        config = ServerConfig.model_validate(data)
    except ValidationError as err:
        ours = {p.key for p in issues}
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "config"
            if e["loc"] == () or key in ours:  # the model-level route check is re-reported one by one below
                continue
            field = ServerConfig.model_fields.get(str(e["loc"][0]))
            problems.append(Problem(f"{source}: {key}", e["msg"].removeprefix("Value error, "),
                                    value=e.get("input") if e["type"] != "missing" else None,
                                    allowed=field.description if field else None, fix=_fix(e, key, field)))
        problems += [Problem(f"{source}: routes", msg) for msg in _raw_route_problems(data)]
        raise ConfigError(problems, title="invalid server config") from None
    if problems:
        raise ConfigError(problems, title="invalid server config")
    return config


def _fix(error: dict, key: str, field: Any) -> str:
    """The fix for one invalid server-config key: a did-you-mean, or a valid value to write."""
    if error["type"] == "extra_forbidden":
        return suggestion(key, ServerConfig.model_fields) or f"remove `{key}` (docs/SERVING.md lists every key)"
    default = getattr(field, "default", None)
    if isinstance(default, (int, float, str)) and not isinstance(default, bool):
        return f"e.g. `{key.split('.')[0]}: {default}` (the default)"
    if key.split(".")[0] == "adapters":
        return "write adapters as a mapping of name: folder, e.g. `adapters: {medical: output/medical_lora}`"
    return "see docs/SERVING.md for the values this key takes"


# CLI flag spellings -> ServerConfig keys.
KEY_ALIASES = {"base": "base_model", "adapter": "adapters", "adapter_root": "adapter_roots"}


def load_server_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> ServerConfig:
    """Read a serve YAML file (or none: flags only); `overrides` (CLI flags, None values ignored) win over it.

    Raises:
        ConfigError: unreadable file, not a mapping, or invalid keys.
    """
    from loraforge.config.yaml_io import load_yaml_mapping

    overrides = {KEY_ALIASES.get(k, k): v for k, v in (overrides or {}).items() if v is not None}
    if path is None:
        return server_config_from_dict(overrides, source="flags")
    path = Path(path)
    if not path.is_file():
        raise ConfigError([Problem(str(path), "is a folder, not a server config file" if path.is_dir()
                                   else "server config file not found", fix="name an existing serve YAML file, e.g. "
                                   "configs/serve-medical.yaml")])
    data = load_yaml_mapping(path, what="the server config")
    data.update(overrides)
    return server_config_from_dict(data, source=str(path), base_dir=path.parent)
