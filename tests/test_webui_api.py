"""The web UI's API without a browser: the form is the schema, its YAML is what `load_config` reads, and the
safety rules hold — paths confined to the workspace, the token, the Host/Origin checks, non-loopback binding,
one training per output dir, no shell."""

from __future__ import annotations

import os
import sys
import time

import pytest
import yaml

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from loraforge.config import RunConfig, config_from_dict, load_config  # noqa: E402
from loraforge.webui import app as webui_app  # noqa: E402
from loraforge.webui.form import form_fields, form_to_raw  # noqa: E402
from loraforge.webui.runs import JobManager  # noqa: E402
from loraforge.webui.workspace import Workspace  # noqa: E402


@pytest.fixture
def ws(tmp_path):
    root = tmp_path / "ws"
    (root / "data").mkdir(parents=True)
    (root / "data" / "train.jsonl").write_text('{"instruction": "hi", "output": "hello"}\n')
    (tmp_path / "secret.jsonl").write_text('{"instruction": "secret", "output": "x"}\n')
    return root


def client(root, **kw) -> TestClient:
    return TestClient(webui_app.create_app(root, **kw), base_url="http://127.0.0.1:7860")


# --- the form -------------------------------------------------------------------------------------------

def test_the_form_has_every_schema_field_with_its_description():
    fields = {f.name: f for f in form_fields()}
    assert set(fields) == set(RunConfig.model_fields) - {"image"}
    assert all(f.description for f in fields.values())
    assert fields["quant_bits"].methods == ("qlora",) and fields["lora_rank"].kind == "yaml"
    assert fields["method"].choices[:2] == ["lora", "qlora"] and fields["use_dora"].kind == "bool"


def test_the_saved_yaml_is_what_the_cli_loads(ws):
    c = client(ws)
    values = {f.name: f.default for f in form_fields()}  # the untouched form…
    values.update(metadata_path="data/train.jsonl", learning_rate="1e-4", target_modules="[q_proj, v_proj]",
                  system_prompt="Be brief: always.", use_dora="true", max_steps="3")
    r = c.post("/api/config/save", json={"values": values, "path": "configs/a.yaml"}).json()
    assert r == {"path": "configs/a.yaml", "cli": "loraforge train configs/a.yaml"}
    raw = yaml.safe_load((ws / "configs" / "a.yaml").read_text())
    assert raw == {"metadata_path": "data/train.jsonl", "target_modules": ["q_proj", "v_proj"],  # …only changes
                   "use_dora": True, "max_steps": 3, "learning_rate": 1e-4, "system_prompt": "Be brief: always."}
    cfg = load_config(ws / "configs" / "a.yaml")
    assert cfg == config_from_dict(form_to_raw(values))
    loaded = c.get("/api/config/load", params={"path": "configs/a.yaml"}).json()["values"]
    assert form_to_raw({**values, **loaded}) == raw


def test_a_bad_value_comes_back_on_its_field_with_the_fix(ws):
    r = client(ws).post("/api/check", json={"values": {"lora_rank": "0", "learnig_rate": "1"}}).json()
    by_key = {p["key"]: p for p in r["problems"]}
    assert by_key["lora_rank"]["fix"] == "set e.g. `lora_rank: 8`" and by_key["lora_rank"]["allowed"] == "> 0"
    assert "learning_rate" in by_key["learnig_rate"]["fix"]


# --- paths ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["../secret.jsonl", "/etc/passwd", "data/../../secret.jsonl", "link/secret.jsonl"])
def test_paths_outside_the_workspace_are_refused(ws, path):
    (ws / "link").symlink_to(ws.parent)  # a symlink out of the workspace counts as outside
    c = client(ws)
    r = c.get("/api/dataset/preview", params={"path": path})
    assert r.status_code == 400 and r.json()["problems"][0]["message"] == "is outside the workspace"
    assert c.get("/api/config/load", params={"path": path}).status_code == 400
    assert c.post("/api/config/save", json={"values": {}, "path": path.replace(".jsonl", ".yaml")}).status_code == 400
    problems = c.post("/api/check", json={"values": {"metadata_path": path}}).json()["problems"]
    assert problems[0]["key"] == "metadata_path" and "outside" in problems[0]["message"]
    assert c.get("/api/metrics", params={"dir": path}).status_code == 400
    assert "secret" not in str(c.get("/api/datasets").json())


def test_the_model_picker_names_seed_families(ws):
    import json

    for name, config in {"glm2": {"model_type": "chatglm", "architectures": ["ChatGLMModel"]},
                         "glm1": {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "position_encoding_2d": True},
                         "conv": {"model_type": "glm", "loraforge_converted_from": "chatglm"},
                         "plain": {"model_type": "llama"}}.items():
        (ws / "models" / name).mkdir(parents=True)
        (ws / "models" / name / "config.json").write_text(json.dumps(config))
    kinds = {m["value"]: m["kind"] for m in client(ws).get("/api/models").json()}
    assert kinds["smollm2"] == "built-in" and kinds["models/plain"] == "hf dir"
    assert kinds["models/glm2"] == "chatglm checkpoint: converts to native GlmForCausalLM"
    assert kinds["models/glm1"].startswith("chatglm checkpoint: not convertible (ChatGLM-6B (v1")
    assert kinds["models/conv"] == "converted from chatglm"


def test_extra_roots_are_readable(ws):
    c = client(ws, extra_roots=[ws.parent])
    assert c.get("/api/dataset/preview", params={"path": str(ws.parent / "secret.jsonl")}).json()["rows"][0][
        "instruction"] == "secret"


# --- token, host, origin --------------------------------------------------------------------------------

def test_token_is_required_when_set(ws):
    c = client(ws, token="s3cret")
    assert c.get("/").status_code == 401 and c.get("/api/runs").status_code == 401
    assert c.get("/api/runs", headers={"X-Loraforge-Token": "wrong"}).status_code == 401
    assert c.get("/api/runs", headers={"X-Loraforge-Token": "s3cret"}).status_code == 200
    r = c.get("/?token=s3cret", follow_redirects=False)  # the printed URL sets a cookie, then drops the token
    assert r.status_code == 303 and r.headers["location"] == "/" and "loraforge_token=s3cret" in r.headers["set-cookie"]
    assert c.get("/").status_code == 200  # the cookie now


def test_other_hosts_and_cross_site_posts_are_refused(ws):
    c = client(ws, allowed_hosts={"127.0.0.1", "localhost"})
    assert c.get("/api/runs").status_code == 200
    assert c.get("/api/runs", headers={"Host": "evil.example:7860"}).status_code == 403  # DNS rebinding
    assert c.post("/api/check", json={"values": {}}, headers={"Origin": "http://evil.example"}).status_code == 403
    assert c.post("/api/check", json={"values": {}}, headers={"Origin": "http://127.0.0.1:7860"}).status_code == 200


def test_binding_beyond_loopback_always_needs_a_token(ws, monkeypatch):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **kw: seen.update(app=app, host=host))
    lines: list[str] = []
    webui_app.run_webui(ws, host="0.0.0.0", port=7999, echo=lines.append)
    url = next(l for l in lines if l.startswith("open "))
    token = url.split("?token=")[1]
    assert len(token) >= 24 and seen["host"] == "0.0.0.0"
    c = TestClient(seen["app"])
    assert c.get("/api/runs").status_code == 401
    assert c.get("/api/runs", headers={"X-Loraforge-Token": token}).status_code == 200
    lines.clear()
    webui_app.run_webui(ws, host="127.0.0.1", port=7999, echo=lines.append)
    assert "token" not in " ".join(lines)
    assert TestClient(seen["app"], base_url="http://127.0.0.1:7999").get("/api/runs").status_code == 200
    assert TestClient(seen["app"], base_url="http://evil.example").get("/api/runs").status_code == 403


# --- child processes ------------------------------------------------------------------------------------

def test_one_training_per_output_dir_and_no_shell(ws):
    # A stand-in for `python -m loraforge`: sleeps, and writes its arguments exactly as it got them.
    jobs = JobManager(Workspace(ws), launcher=[sys.executable, "-c",
                                               "import sys, time; print(sys.argv[1:], flush=True); time.sleep(30)"])
    out = ws / "output" / "a"
    tricky = "x; touch PWNED $(touch PWNED2)"
    rec = jobs.start("train", [tricky], target=out)
    try:
        with pytest.raises(Exception) as err:
            jobs.start("train", ["other.yaml"], target=out)
        assert "already writing this folder" in str(err.value)
        deadline = time.time() + 10
        while len(jobs.log_tail(rec).strip().splitlines()) < 2 and time.time() < deadline:
            time.sleep(0.1)
        head, printed = jobs.log_tail(rec).strip().splitlines()
        assert printed == str(["train", tricky]) and head == f"$ loraforge train '{tricky}'"
        assert not (ws / "PWNED").exists() and not (ws / "PWNED2").exists()
        assert jobs.running(rec)
    finally:
        jobs.stop(rec["id"])
    deadline = time.time() + 10
    while jobs.running(rec) and time.time() < deadline:
        time.sleep(0.1)
    assert not jobs.running(rec)
    assert jobs.start("train", ["b.yaml"], target=out)  # free again
    for r in jobs.jobs():
        if jobs.running(r):
            os.kill(r["pid"], 15)


def test_eval_and_merge_run_the_cli_commands_on_confined_paths(ws):
    app = webui_app.create_app(ws)
    jobs = app.state.webui.jobs
    jobs.launcher = [sys.executable, "-c", "import sys; print(sys.argv[1:])"]  # records what would run
    run = ws / "output" / "r1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("base_model: smollm2\n")
    c = TestClient(app, base_url="http://127.0.0.1:7860")
    r = c.post("/api/eval", json={"data": "data/train.jsonl", "adapters": ["output/r1"], "limit": 4}).json()
    argv = jobs.job(r["job"])["argv"][len(jobs.launcher):]
    assert argv == ["eval", "--data", str(ws / "data" / "train.jsonl"), "--out", str(ws / "eval" / "train"),
                    "--base", "smollm2", "--adapter", f"output-r1={run}", "--limit", "4"]
    r = c.post("/api/export", json={"dir": "output/r1", "to": "merge"}).json()
    assert jobs.job(r["job"])["argv"][len(jobs.launcher):] == ["merge", str(run), "--out",
                                                                str(ws / "exports" / "r1-merge")]
    assert c.post("/api/eval", json={"data": "../secret.jsonl"}).status_code == 400
    assert c.post("/api/export", json={"dir": "output/r1", "to": "nope"}).json()["problems"][0]["allowed"].startswith("merge")
    deadline = time.time() + 10
    while any(jobs.running(j) for j in jobs.jobs()) and time.time() < deadline:
        time.sleep(0.1)
    done = c.get("/api/job", params={"id": r["job"]}).json()
    assert done["exit_code"] == 0 and "merge" in done["log"]
