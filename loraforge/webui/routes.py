"""The web UI's JSON API. Every path in a request goes through `Workspace.resolve`; every child process gets an
argument list built here (never a shell string). User mistakes come back as 400 with `problems`."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import yaml
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from loraforge.errors import LoraforgeError, Problem
from loraforge.webui import checks, jobview
from loraforge.webui.form import cli_command, form_fields, form_to_raw, raw_to_form
from loraforge.webui.launch import parse_processes
from loraforge.webui.runs import JobError, read_metrics
from loraforge.webui.workspace import preview_rows

router = APIRouter(prefix="/api")


def _ctx(request: Request) -> Any:
    return request.app.state.webui


def _problems(err: LoraforgeError, status: int = 400) -> JSONResponse:
    return JSONResponse({"problems": [checks.problem_json(p) for p in err.problems], "error": err.format()},
                        status_code=status)


async def _body(request: Request) -> dict:
    try:
        data = await request.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise LoraforgeError([Problem("body", "expected a JSON object")])
    return data


def _yaml_text(raw: dict) -> str:
    return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True) if raw else "{}\n"


# --- pickers --------------------------------------------------------------------------------------------

@router.get("/schema")
def schema() -> Any:
    return [f.__dict__ for f in form_fields()]


@router.get("/models")
def models(request: Request) -> Any:
    return _ctx(request).ws.models()


@router.get("/datasets")
def datasets(request: Request) -> Any:
    return _ctx(request).ws.datasets()


@router.get("/configs")
def configs(request: Request) -> Any:
    return _ctx(request).ws.configs()


@router.get("/dataset/preview")
def dataset_preview(request: Request, path: str) -> Any:
    try:
        file = _ctx(request).ws.resolve(path, key="metadata_path", must_exist=True)
        if not file.is_file():
            raise LoraforgeError([Problem("metadata_path", "is not a file", value=path)])
        return {"path": path, "rows": preview_rows(file)}
    except LoraforgeError as err:
        return _problems(err)


# --- config ---------------------------------------------------------------------------------------------

@router.post("/check")
async def check(request: Request) -> Any:
    """Form values → YAML, the equivalent CLI command and the config problems (instant)."""
    try:
        body = await _body(request)
    except LoraforgeError as err:
        return _problems(err)
    raw = form_to_raw(body.get("values") or {})
    processes, launch_problems = parse_processes(body.get("processes"))
    problems = [checks.problem_json(p) for p in launch_problems] + checks.quick_check(raw, _ctx(request).ws)
    return {"yaml": _yaml_text(raw), "problems": problems,
            "cli": cli_command(body.get("path") or "config.yaml", processes if not launch_problems else 1)}


@router.post("/preflight")
async def preflight(request: Request) -> Any:
    """Preflight (model, method, data) and the estimate (per process); seconds the first time, cached after."""
    try:
        body = await _body(request)
    except LoraforgeError as err:
        return _problems(err)
    from starlette.concurrency import run_in_threadpool

    raw = form_to_raw(body.get("values") or {})
    processes, launch_problems = parse_processes(body.get("processes"))
    result = await run_in_threadpool(checks.full_check, raw, _ctx(request).ws, 1 if launch_problems else processes)
    return {**result, "problems": [checks.problem_json(p) for p in launch_problems] + result["problems"]}


@router.post("/tokens")
async def tokens(request: Request) -> Any:
    try:
        body = await _body(request)
    except LoraforgeError as err:
        return _problems(err)
    from starlette.concurrency import run_in_threadpool

    raw = form_to_raw(body.get("values") or {})
    return await run_in_threadpool(checks.token_view, raw, _ctx(request).ws, int(body.get("rows", 3)))


def _config_path(ctx: Any, path: str) -> Path:
    target = ctx.ws.resolve(path, key="config")
    if target.suffix not in (".yaml", ".yml"):
        raise LoraforgeError([Problem("config", "must end in .yaml", value=path, fix=f"{path}.yaml")])
    return target


@router.post("/config/save")
async def config_save(request: Request) -> Any:
    ctx = _ctx(request)
    try:
        body = await _body(request)
        target = _config_path(ctx, str(body.get("path") or ""))
        from loraforge.atomic import atomic_write_text

        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, _yaml_text(form_to_raw(body.get("values") or {})))
        rel = ctx.ws.relative(target)
        return {"path": rel, "cli": cli_command(rel)}
    except LoraforgeError as err:
        return _problems(err)


@router.get("/config/load")
def config_load(request: Request, path: str) -> Any:
    try:
        return {"values": _read_yaml(_ctx(request).ws.resolve(path, key="config", must_exist=True).read_text(
            encoding="utf-8")), "path": path}
    except LoraforgeError as err:
        return _problems(err)


@router.post("/config/parse")
async def config_parse(request: Request) -> Any:
    """A YAML text (an uploaded file) → form values."""
    try:
        body = await _body(request)
        return {"values": _read_yaml(str(body.get("yaml") or ""))}
    except LoraforgeError as err:
        return _problems(err)


def _read_yaml(text: str) -> dict:
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise LoraforgeError([Problem("config", f"not valid YAML: {e}")]) from None
    if not isinstance(raw, dict):
        raise LoraforgeError([Problem("config", "the config must be a mapping of key: value")])
    return raw_to_form(raw)


# --- runs -----------------------------------------------------------------------------------------------

@router.post("/train")
async def train(request: Request) -> Any:
    """Save the config and start `loraforge train CONFIG` (under torchrun for `processes` > 1) — refused while any
    check finds a problem."""
    from starlette.concurrency import run_in_threadpool

    ctx = _ctx(request)
    try:
        body = await _body(request)
        raw = form_to_raw(body.get("values") or {})
        processes, launch_problems = parse_processes(body.get("processes"))
        if launch_problems:
            raise LoraforgeError(launch_problems)
        result = await run_in_threadpool(checks.full_check, raw, ctx.ws, processes)
        if result["problems"]:
            return JSONResponse({"problems": result["problems"], "error": "fix the problems first"}, status_code=400)
        data, _ = checks.confined(raw, ctx.ws)
        run_dir = Path(data.get("output_dir") or ctx.ws.root / "output/run")
        target = _config_path(ctx, str(body.get("path") or f"configs/{run_dir.name}.yaml"))
        from loraforge.atomic import atomic_write_text

        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, _yaml_text(raw))
        rec = ctx.jobs.start("train", [str(target)], target=run_dir, processes=processes)
        return {"job": rec["id"], "dir": ctx.ws.relative(run_dir), "config": ctx.ws.relative(target),
                "cli": cli_command(ctx.ws.relative(target), processes), "processes": processes}
    except JobError as err:
        return _problems(err, 409)
    except LoraforgeError as err:
        return _problems(err)


@router.get("/runs")
def runs(request: Request) -> Any:
    return _ctx(request).jobs.runs()


def _run_dir(ctx: Any, path: str) -> Path:
    run_dir = ctx.ws.resolve(path, key="run", must_exist=True)
    if not (run_dir / "config.yaml").is_file():
        raise LoraforgeError([Problem("run", "is not a run dir (no config.yaml)", value=path)])
    return run_dir


@router.get("/run")
def run(request: Request, dir: str) -> Any:
    ctx = _ctx(request)
    try:
        run_dir = _run_dir(ctx, dir)
        info = ctx.jobs.describe(run_dir)
        rec = ctx.jobs.run_job(run_dir)
        info["log"] = ctx.jobs.log_tail(rec) if rec else ""
        info["config"] = (run_dir / "config.yaml").read_text(encoding="utf-8")
        return info
    except LoraforgeError as err:
        return _problems(err)


@router.get("/metrics")
def metrics(request: Request, dir: list[str] = Query(...)) -> Any:
    """{run dir: metrics.jsonl records} for each `dir` (several: overlaid on one chart)."""
    ctx = _ctx(request)
    try:
        return {d: read_metrics(ctx.ws.resolve(d, key="run") / "metrics.jsonl") for d in dir[:12]}
    except LoraforgeError as err:
        return _problems(err)


@router.post("/run/stop")
async def run_stop(request: Request) -> Any:
    ctx = _ctx(request)
    try:
        body = await _body(request)
        rec = ctx.jobs.run_job(ctx.ws.resolve(str(body.get("dir") or ""), key="run", must_exist=True))
        if rec is None or not ctx.jobs.running(rec):
            raise LoraforgeError([Problem("run", "is not running", value=body.get("dir"))])
        ctx.jobs.stop(rec["id"])
        return {"stopping": rec["id"]}
    except LoraforgeError as err:
        return _problems(err)


@router.post("/run/resume")
async def run_resume(request: Request) -> Any:
    """`loraforge train RUN/config.yaml --set resume_from_checkpoint=latest` (output_dir pointed at this run), on
    as many processes as the run's last job (or `processes`: a checkpoint resumes on any number)."""
    ctx = _ctx(request)
    try:
        body = await _body(request)
        run_dir = _run_dir(ctx, str(body.get("dir") or ""))
        if not any(run_dir.glob("checkpoint-*")):
            raise LoraforgeError([Problem("run", "has no checkpoint to resume from", value=body.get("dir"))])
        saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        args = [str(run_dir / "config.yaml"), "--set", "resume_from_checkpoint=latest"]
        if (ctx.ws.root / str(saved.get("output_dir", ""))).resolve() != run_dir:
            args += ["--set", f"output_dir={run_dir}"]
        last = ctx.jobs.run_job(run_dir)
        processes, launch_problems = parse_processes(body.get("processes") or (last or {}).get("processes"))
        if launch_problems:
            raise LoraforgeError(launch_problems)
        rec = ctx.jobs.start("train", args, target=run_dir, processes=processes)
        return {"job": rec["id"], "dir": ctx.ws.relative(run_dir), "processes": processes}
    except JobError as err:
        return _problems(err, 409)
    except LoraforgeError as err:
        return _problems(err)


# --- chat -----------------------------------------------------------------------------------------------

@router.post("/chat")
async def chat(request: Request) -> Any:
    """NDJSON stream: base first, then each adapter, same prompt, same settings."""
    ctx = _ctx(request)
    try:
        body = await _body(request)
    except LoraforgeError as err:
        return _problems(err)
    lines = ctx.chat.stream(str(body.get("base") or "smollm2"), [str(a) for a in body.get("adapters") or []],
                            str(body.get("prompt") or ""), system=body.get("system"),
                            settings=body.get("settings") or {})
    return StreamingResponse(lines, media_type="application/x-ndjson")


# --- evaluate and export --------------------------------------------------------------------------------

def _exporters() -> list[str]:
    """`export --to X` targets when the exporters package is installed (merge is always there)."""
    if importlib.util.find_spec("loraforge.exporters") is None:
        return []
    import loraforge.exporters as ex

    return sorted(getattr(ex, "EXPORTERS", {}) or {})


QUANT_TARGETS = ("gguf", "ollama")  # the targets that write a model GGUF (`export --quant`)


def _quants() -> tuple[str, ...]:
    """The GGUF types `export --quant` writes itself (f16 first: the default)."""
    from loraforge.exporters.gguf_model import QUANTS

    return ("f16", *(q for q in QUANTS if q != "f16"))


@router.get("/exports")
def exports() -> Any:
    """The targets with their help line, and the GGUF types for the targets that take one."""
    helps = {"merge": "`loraforge merge`: the adapter merged into its base (a verified transformers folder)"}
    if _exporters():
        import loraforge.exporters as ex

        helps.update({name: e.help for name, e in ex.EXPORTERS.items()})
    targets = ["merge"] + _exporters()
    quant_targets = [t for t in QUANT_TARGETS if t in targets]
    return {"targets": [{"name": t, "help": helps.get(t, "")} for t in targets], "quant_targets": quant_targets,
            "quants": list(_quants()) if quant_targets else []}


@router.post("/eval")
async def eval_run(request: Request) -> Any:
    ctx = _ctx(request)
    try:
        body = await _body(request)
        data = ctx.ws.resolve(str(body.get("data") or ""), key="data", must_exist=True)
        out = ctx.ws.resolve(str(body.get("out") or f"eval/{data.stem}"), key="out")
        args = ["--data", str(data), "--out", str(out)]
        base = str(body.get("base") or "smollm2")
        args += ["--base", base if base == "smollm2" else str(ctx.ws.resolve(base, key="base", must_exist=True))]
        for a in body.get("adapters") or []:
            d = ctx.ws.resolve(str(a), key="adapter", must_exist=True)
            from loraforge.webui.chat import _name_for

            args += ["--adapter", f"{_name_for(ctx.ws.relative(d))}={d}"]
        if body.get("limit"):
            args += ["--limit", str(int(body["limit"]))]
        if body.get("max_new_tokens"):
            args += ["--max-new-tokens", str(int(body["max_new_tokens"]))]
        rec = ctx.jobs.start("eval", args, target=out)
        return {"job": rec["id"], "out": ctx.ws.relative(out)}
    except JobError as err:
        return _problems(err, 409)
    except (LoraforgeError, ValueError) as err:
        return _problems(err if isinstance(err, LoraforgeError) else LoraforgeError(str(err)))


@router.post("/export")
async def export(request: Request) -> Any:
    ctx = _ctx(request)
    try:
        body = await _body(request)
        run_dir = _run_dir(ctx, str(body.get("dir") or ""))
        target = str(body.get("to") or "merge")
        out = ctx.ws.resolve(str(body.get("out") or f"exports/{run_dir.name}-{target}"), key="out")
        if target == "merge":
            rec = ctx.jobs.start("merge", [str(run_dir), "--out", str(out)], target=out)
        elif target in _exporters():
            args = [str(run_dir), "--to", target, "--out", str(out)]
            quant = str(body.get("quant") or "")
            if quant and target in QUANT_TARGETS:
                if quant not in _quants():
                    raise LoraforgeError([Problem("quant", "unknown GGUF type", value=quant,
                                                  allowed=", ".join(_quants()))])
                args += ["--quant", quant]
            rec = ctx.jobs.start("export", args, target=out)
        else:
            raise LoraforgeError([Problem("to", "unknown export target", value=target,
                                          allowed=", ".join(["merge"] + _exporters()))])
        return {"job": rec["id"], "out": ctx.ws.relative(out)}
    except JobError as err:
        return _problems(err, 409)
    except LoraforgeError as err:
        return _problems(err)


@router.get("/job")
def job(request: Request, id: str) -> Any:
    ctx = _ctx(request)
    try:
        rec = ctx.jobs.job(id)
    except LoraforgeError as err:
        return _problems(err)
    running = ctx.jobs.running(rec)
    log = ctx.jobs.log_tail(rec)
    out = {"id": rec["id"], "kind": rec["kind"], "running": running, "exit_code": rec.get("exit_code"), "log": log,
           "target": ctx.ws.relative(Path(rec["target"])), "started": rec.get("started"), "ended": rec.get("ended"),
           "progress": jobview.progress(rec["kind"], log) if running else None}
    report = Path(rec["target"]) / "eval_report.md"
    if rec["kind"] == "eval" and report.is_file():
        out["report"] = report.read_text(encoding="utf-8")
        out["eval"] = jobview.eval_summary(Path(rec["target"]))
        if out["eval"]:
            out["eval"]["data"] = ctx.ws.relative(Path(out["eval"]["data"]))
    if rec["kind"] in ("merge", "export") and not running and rec.get("exit_code") == 0:
        target = Path(rec["target"])
        out["files"] = sorted([{"name": p.name, "bytes": p.stat().st_size} for p in target.iterdir() if p.is_file()],
                              key=lambda f: -f["bytes"])[:8] if target.is_dir() else []
    return out


@router.get("/jobs")
def jobs(request: Request) -> Any:
    ctx = _ctx(request)
    return [{"id": r["id"], "kind": r["kind"], "target": ctx.ws.relative(Path(r["target"])),
             "running": ctx.jobs.running(r), "exit_code": r.get("exit_code")} for r in ctx.jobs.jobs()[-20:]]
