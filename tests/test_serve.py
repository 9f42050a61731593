"""`loraforge serve` end to end: a real uvicorn server on a free loopback port, spoken to with the official
`openai` client (and raw httpx for malformed input). Two adapters trained to give different answers
(cardiology -> CARDIO-7, diabetes -> GLUCO-3) must answer differently through the same server."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from loraforge.errors import ConfigError
from loraforge.inference import InferenceModel
from loraforge.serve.background import BackgroundServer
from loraforge.serve.config import ServerConfig, load_server_config, server_config_from_dict
from loraforge.serve.demo import DEMO_ANSWERS, default_demo_dir, train_demo_adapters

pytestmark = pytest.mark.slow
KEY = "sk-test-123"
Q = [{"role": "user", "content": "What is a healthy breakfast?"}]


@pytest.fixture(scope="module")
def adapters(smollm2_dir) -> dict[str, Path]:
    return train_demo_adapters(smollm2_dir, default_demo_dir(smollm2_dir))


@pytest.fixture(scope="module")
def model(smollm2_dir, adapters) -> InferenceModel:
    return InferenceModel.load(smollm2_dir, {k: str(v) for k, v in adapters.items()},
                               adapter_roots=[adapters["cardiology"].parent])


def _config(adapters, smollm2_dir, **kw) -> ServerConfig:
    root = adapters["cardiology"].parent
    return ServerConfig(base_model=str(smollm2_dir), adapters={"cardiology": "cardiology", "diabetes": "diabetes"},
                        adapter_roots=[root], api_key=KEY, default_temperature=0.0, route_seed=0,
                        routes={"medical": [{"adapter": "cardiology", "weight": 1}, {"adapter": "diabetes", "weight": 1}]},
                        **kw)


@pytest.fixture(scope="module")
def server(model, adapters, smollm2_dir):
    from loraforge.serve.app import create_app

    with BackgroundServer(create_app(_config(adapters, smollm2_dir), model)) as srv:
        yield srv


@pytest.fixture()
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)


def _owner(text: str) -> str:
    hits = [name for name, code in DEMO_ANSWERS.items() if code in text]
    return hits[0] if len(hits) == 1 else ("base" if not hits else "?")


def _chat(client, model: str, **kw):
    return client.chat.completions.create(model=model, messages=Q, max_tokens=10, temperature=0, **kw)


def test_model_list_and_adapter_switching(client):
    assert [m.id for m in client.models.list().data] == ["base", "cardiology", "diabetes", "medical"]
    for name in ["cardiology", "diabetes", "base"]:
        raw = client.chat.completions.with_raw_response.create(model=name, messages=Q, max_tokens=10, temperature=0)
        reply = raw.parse()
        assert _owner(reply.choices[0].message.content) == name
        assert raw.headers["x-loraforge-adapter"] == name and reply.model_extra["loraforge_adapter"] == name
        assert reply.model == name and reply.usage.completion_tokens > 0
        assert reply.choices[0].finish_reason == ("length" if name == "base" else "stop")


def test_streaming_chat_and_usage(client):
    chunks = list(_chat(client, "diabetes", stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "GLUCO-3" in text and len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-1].model_extra["loraforge_adapter"] == "diabetes"
    assert text == _chat(client, "diabetes").choices[0].message.content


def test_sse_wire_format_ends_with_done(server):
    import httpx

    body = {"model": "cardiology", "messages": Q, "max_tokens": 10, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=300) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


def test_completions_raw_prompt_and_stop(client, model):
    prompt = model.tokenizer.apply_chat_template(Q, add_generation_prompt=True, tokenize=False)
    reply = client.completions.create(model="cardiology", prompt=prompt, max_tokens=10, temperature=0)
    assert reply.object == "text_completion" and "CARDIO-7" in reply.choices[0].text
    cut = client.completions.create(model="cardiology", prompt=[prompt, prompt], max_tokens=10, temperature=0, stop=["-"])
    assert [c.text for c in cut.choices] == ["CARDIO", "CARDIO"] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="diabetes", prompt=prompt, max_tokens=10, temperature=0, stream=True))
    assert "GLUCO-3" in streamed


def test_ab_route_reports_the_adapter_it_chose(client):
    seen = []
    for _ in range(8):
        reply = _chat(client, "medical")
        adapter = reply.model_extra["loraforge_adapter"]
        assert _owner(reply.choices[0].message.content) == adapter and reply.model == "medical"
        seen.append(adapter)
    assert set(seen) == {"cardiology", "diabetes"}


def test_api_key_is_required(server):
    import httpx
    import openai

    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "base", "messages": Q})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(server.url + "/admin/adapters", json={"name": "x", "path": "cardiology"})
    assert r.status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # liveness needs no key


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "Invalid request"),
    ({"model": "base"}, 400, "messages"),
    ({"model": "base", "messages": []}, 400, "messages"),
    ({"model": "base", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"model": "base", "messages": Q, "temperature": 7}, 400, "temperature"),
    ({"model": "base", "messages": Q, "n": 3}, 400, "n"),
    ({"model": "base", "messages": Q, "max_tokens": 10 ** 6}, 400, "max_tokens"),
    ({"model": "base", "messages": Q, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "cardiologgy", "messages": Q}, 404, "you mean `cardiology`"),
    (["a list"], 400, "Invalid request"),
])
def test_malformed_requests_get_openai_style_4xx(server, body, status, needle):
    import httpx

    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}",
                                                                 "content-type": "application/json"}, timeout=60, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"] and "Traceback" not in r.text


def test_unknown_model_error_lists_models(client):
    import openai

    with pytest.raises(openai.NotFoundError) as err:
        _chat(client, "pediatrics")
    assert "base, cardiology, diabetes, medical" in str(err.value)


def test_admin_load_replace_rollback_unload_and_traversal(server, client):
    import httpx

    admin = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300)
    for path in ["../../etc", "/etc", "cardiology/../../.."]:
        r = admin.post("/admin/adapters", json={"name": "evil", "path": path})
        assert r.status_code == 400 and "outside the allowed adapter roots" in r.json()["error"]["message"], r.text
    r = admin.post("/admin/adapters", json={"name": "pediatrics", "path": "cardiology"})
    assert r.status_code == 201 and r.json()["version"] == "1"
    assert admin.post("/admin/adapters", json={"name": "pediatrics", "path": "diabetes"}).status_code == 409
    assert _owner(_chat(client, "pediatrics").choices[0].message.content) == "cardiology"

    r = admin.put("/admin/adapters/pediatrics", json={"path": "diabetes"})
    assert r.status_code == 200 and r.json()["previous_path"].endswith("cardiology")
    assert _owner(_chat(client, "pediatrics").choices[0].message.content) == "diabetes"
    admin.put("/admin/adapters/pediatrics", json={"path": r.json()["previous_path"]})  # rollback
    assert _owner(_chat(client, "pediatrics").choices[0].message.content) == "cardiology"

    assert admin.delete("/admin/adapters/cardiology").status_code == 409  # used by the `medical` route
    assert admin.delete("/admin/adapters/pediatrics").status_code == 200
    assert admin.delete("/admin/adapters/pediatrics").status_code == 404
    assert "pediatrics" not in [m.id for m in client.models.list().data]
    assert _owner(_chat(client, "cardiology").choices[0].message.content) == "cardiology"


def _load(client_factory, clients: int, per_client: int) -> list[tuple[str, str]]:
    """`clients` threads × `per_client` requests cycling through the adapters and base; (asked, owner) pairs."""
    names = ["cardiology", "diabetes", "base"]

    def worker(i: int) -> list[tuple[str, str]]:
        client = client_factory()
        out = []
        for j in range(per_client):
            name = names[(i + j) % 3]
            q = [{"role": "user", "content": f"Question {i}-{j}: how should I take care of myself?"}]
            reply = client.chat.completions.create(model=name, messages=q, max_tokens=10, temperature=0)
            out.append((name, _owner(reply.choices[0].message.content)))
        return out

    with ThreadPoolExecutor(clients) as pool:
        return [pair for part in pool.map(worker, range(clients)) for pair in part]


def test_concurrent_clients_each_get_their_own_adapter(server):
    """16 concurrent clients × 8 requests, adapters and base mixed: no errors, no cross-talk."""
    from openai import OpenAI

    pairs = _load(lambda: OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=600), 16, 8)
    assert len(pairs) == 128
    assert [p for p in pairs if p[0] != p[1]] == []
    stats = __import__("httpx").get(server.url + "/health").json()
    assert stats["scheduling"] == "batch" and stats["mean_batch"] > 1  # requests really shared batches


def test_lock_scheduling_is_isolated_too(model, adapters, smollm2_dir):
    from openai import OpenAI

    from loraforge.serve.app import create_app

    with BackgroundServer(create_app(_config(adapters, smollm2_dir, scheduling="lock"), model)) as srv:
        pairs = _load(lambda: OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=600), 4, 3)
    assert [p for p in pairs if p[0] != p[1]] == [] and len(pairs) == 12


def test_server_config_yaml_and_errors(tmp_path):
    (tmp_path / "adapters").mkdir()
    (tmp_path / "serve.yaml").write_text(
        "base_model: smollm2\nadapter_roots: [adapters]\nadapters: {cardiology: cardiology}\n"
        "routes:\n  medical: [{adapter: cardiology, weight: 0.9}, {adapter: base, weight: 0.1}]\n")
    cfg = load_server_config(tmp_path / "serve.yaml", {"port": 9001, "api_key": None})
    assert cfg.host == "127.0.0.1" and cfg.port == 9001 and cfg.adapter_roots == [tmp_path / "adapters"]
    flags = load_server_config(None, {"base": "smollm2", "adapters": {"a": "runs/a"}, "port": None})  # CLI, no YAML
    assert flags.base_model == "smollm2" and flags.adapters == {"a": "runs/a"} and flags.port == 8000
    with pytest.raises(ConfigError) as err:
        server_config_from_dict({"prot": 1, "routes": {"ab": [{"adapter": "nope", "weight": 1}]}})
    text = err.value.format()
    assert "did you mean `port`" in text and "unknown adapter `nope`" in text


def test_shipped_serve_configs_load():
    configs = sorted((Path(__file__).parents[1] / "configs").glob("serve-*.yaml"))
    assert configs
    for path in configs:
        load_server_config(path)


def test_requests_beyond_max_concurrency_get_429(model, adapters, smollm2_dir):
    """An open stream holds its slot until it ends; with max_concurrency 1 the next request is refused."""
    import httpx

    from loraforge.serve.app import create_app

    with BackgroundServer(create_app(_config(adapters, smollm2_dir, max_concurrency=1), model)) as srv:
        auth = {"Authorization": f"Bearer {KEY}"}
        body = {"model": "base", "messages": Q, "max_tokens": 10, "temperature": 0}
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json={**body, "stream": True}, headers=auth,
                          timeout=300) as held:
            assert held.status_code == 200
            lines = held.iter_lines()
            next(lines)  # the stream has started and holds the only slot
            busy = httpx.post(srv.url + "/v1/chat/completions", json=body, headers=auth, timeout=300)
            assert busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error"
            assert [line for line in lines if line][-1] == "data: [DONE]"
        assert httpx.post(srv.url + "/v1/chat/completions", json=body, headers=auth, timeout=300).status_code == 200
