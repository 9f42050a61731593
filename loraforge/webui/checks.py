"""What the New-run page shows beside the form: config problems (instantly), preflight and estimate (cached,
seconds), and "what the model will learn" — the first rows tokenized exactly as training will see them.

Every check is the CLI's own function (`config_from_dict`, `run_preflight`, `estimate_memory`,
`encode_conversation`); this module only turns their results into JSON for the page.
"""

from __future__ import annotations

import json
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from loraforge.errors import LoraforgeError, Problem
from loraforge.webui.form import PATH_KEYS, absolutize
from loraforge.webui.workspace import Workspace

heavy_lock = threading.Lock()  # one preflight / estimate / tokenizer or model load at a time (CPU-heavy)
_lock = heavy_lock
_full_cache: dict[str, dict] = {}
_baselines: dict[str, int] = {}


def problem_json(p: Problem) -> dict:
    return {"key": p.key.split(".")[0].split("[")[0], "where": p.key, "message": p.message,
            "value": None if p.value is None else str(p.value), "allowed": p.allowed, "fix": p.fix}


def confined(raw: Mapping[str, Any], ws: Workspace) -> tuple[dict[str, Any], list[Problem]]:
    """Paths made absolute against the workspace; any outside it becomes a problem on its key."""
    out = absolutize(raw, ws.root)
    problems: list[Problem] = []
    for key in PATH_KEYS + ("base_model",):
        value = out.get(key)
        if not isinstance(value, str) or not value.strip():
            continue
        if key == "base_model" and not Path(value).is_absolute():
            continue  # a built-in name
        try:
            out[key] = str(ws.resolve(value, key=key))
        except LoraforgeError as err:
            problems += err.problems
    return out, problems


def quick_check(raw: Mapping[str, Any], ws: Workspace) -> list[dict]:
    """Config problems only (milliseconds): what `load_config` would report for this YAML."""
    from loraforge.config import config_from_dict

    data, problems = confined(raw, ws)
    if not problems:
        try:
            problems = launch_config_problems(config_from_dict(data))
        except LoraforgeError as err:
            problems = err.problems
    return [problem_json(p) for p in problems]


def launch_config_problems(cfg: Any) -> list[Problem]:
    """What `sharding: fsdp2` refuses for this config (the trainer would refuse it at start)."""
    if cfg.sharding != "fsdp2":
        return []
    from loraforge.train.sharding_checks import fsdp_problems

    return fsdp_problems(cfg)


def full_check(raw: Mapping[str, Any], ws: Workspace, processes: int = 1) -> dict:
    """Config + preflight (model, method, data) + estimate (per process of `processes`), cached by the config's
    content and the process count.

    Returns {"problems": [...], "stats": DataStats dict | None, "estimate": {...} | None, "summary": str}.
    """
    key = json.dumps([raw, processes], sort_keys=True, default=str)
    if key in _full_cache:
        return _full_cache[key]
    with _lock:
        if key in _full_cache:
            return _full_cache[key]
        result = _full_check(raw, ws, processes)
        _full_cache[key] = result
        if len(_full_cache) > 64:
            _full_cache.pop(next(iter(_full_cache)))
        return result


def _full_check(raw: Mapping[str, Any], ws: Workspace, processes: int) -> dict:
    from loraforge.config import config_from_dict
    from loraforge.preflight import run_preflight

    out: dict[str, Any] = {"problems": [], "stats": None, "estimate": None, "summary": ""}
    data, problems = confined(raw, ws)
    if problems:
        out["problems"] = [problem_json(p) for p in problems]
        return out
    try:
        cfg = config_from_dict(data)
        sharding = launch_config_problems(cfg)
        if sharding:
            raise LoraforgeError(sharding)
        lines: list[str] = []
        report = run_preflight(cfg, echo=lines.append)
        out["summary"] = "\n".join(lines)
        if report.data_stats is not None:
            out["stats"] = report.data_stats.to_dict()
        out["estimate"] = _estimate(cfg, report.model_dir, processes)
    except LoraforgeError as err:
        out["problems"] = [problem_json(p) for p in err.problems]
    return out


def _estimate(cfg: Any, model_dir: Path | None, processes: int = 1) -> dict | None:
    from loraforge.estimate import estimate_memory, measure_baseline_rss

    if model_dir is None or cfg.task_type.value == "TEXT_TO_IMAGE":
        return None
    try:
        if str(model_dir) not in _baselines:
            _baselines[str(model_dir)] = measure_baseline_rss(model_dir)
        est = estimate_memory(cfg, baseline_bytes=_baselines[str(model_dir)], processes=processes)
    except LoraforgeError as err:
        return {"error": err.format()}
    return {"trainable_params": est.trainable_params, "total_params": est.total_params,
            "trainable_percent": round(est.trainable_percent, 4), "peak_bytes": est.peak_bytes,
            "precision": est.precision, "device": est.device, "adapted_modules": est.adapted_modules,
            "processes": est.processes, "sharding": est.sharding, "notes": est.notes}


@lru_cache(maxsize=4)
def _tokenizer(model_dir: str, trust_remote_code: bool) -> Any:
    from loraforge.models.loader import load_tokenizer

    return load_tokenizer(model_dir, trust_remote_code=trust_remote_code)


def token_view(raw: Mapping[str, Any], ws: Workspace, rows: int = 3) -> dict:
    """The first `rows` training examples as training sees them: each token's text, whether it is trained
    (its label is kept) and whether it is a special token (the end-of-turn token shows as itself).

    Returns {"rows": [{"source", "tokens": [{"text", "trained", "special"}], "length", "trained", "truncated"}],
             "cutoff_len", "template"} or {"problems": [...]}.
    """
    data, problems = confined(raw, ws)
    try:
        if problems:
            raise LoraforgeError(problems)
        with _lock:  # transformers' lazy imports are not safe from two threads at once
            return _token_view(data, rows, ws)
    except LoraforgeError as err:
        return {"rows": [], "problems": [problem_json(p) for p in err.problems]}


def _token_view(data: dict, rows: int, ws: Workspace) -> dict:
    from loraforge.config import TaskType, config_from_dict
    from loraforge.data.formats import load_conversations, resolve_train_files
    from loraforge.data.templates import encode_conversation
    from loraforge.models.gguf import resolve_model_path

    cfg = config_from_dict(data)
    if cfg.task_type is not TaskType.CAUSAL_LM:
        return {"rows": [], "note": f"the token view shows chat/alpaca rows of CAUSAL_LM runs "
                                    f"(this run is {cfg.task_type.value})"}
    tok = _tokenizer(str(resolve_model_path(cfg.base_model)), cfg.trust_remote_code)
    files = resolve_train_files(cfg)
    convs = load_conversations(files[:1], cfg.system_prompt)[:rows]
    special = set(tok.all_special_ids)
    out_rows = []
    for source, messages in convs:
        enc, truncated = encode_conversation(tok, messages, template=cfg.template, cutoff_len=cfg.cutoff_len,
                                             train_on_prompt=cfg.train_on_prompt, source=source)
        tokens = [{"text": tok.decode([i]), "trained": pos > 0 and label != -100, "special": i in special}
                  for pos, (i, label) in enumerate(zip(enc.input_ids, enc.labels))]
        path, _, line = source.rpartition(":")
        out_rows.append({"source": f"{ws.relative(Path(path))}:{line}" if path else source, "tokens": tokens, "length": len(enc), "trained": enc.trained_tokens,
                         "truncated": truncated})
    return {"rows": out_rows, "cutoff_len": cfg.cutoff_len, "template": cfg.template}
