"""The server under client mistakes and faults (issue 22, points 6-8): every mistake a 4xx naming the field, an
internal error a 500 on a connection that stays usable, and the server answering everyone afterwards."""

import http.client
import json
import shutil

import pytest

from test_train_helpers import rows_file, run, tiny_llama  # noqa: F401


@pytest.fixture(scope="module")
def served(tiny_llama, rows_file, tmp_path_factory):
    from loraforge.inference import InferenceModel
    from loraforge.serve.app import create_app
    from loraforge.serve.background import BackgroundServer
    from loraforge.serve.config import ServerConfig

    root = tmp_path_factory.mktemp("adapters")
    run(tiny_llama, rows_file, root / "a", max_steps=1)
    model = InferenceModel.load(str(tiny_llama), {"a": str(root / "a")}, adapter_roots=[root])
    config = ServerConfig(base_model=str(tiny_llama), adapters={"a": "a"}, adapter_roots=[root], default_temperature=0.0,
                          max_tokens_limit=64)
    with BackgroundServer(create_app(config, model)) as srv:
        yield srv, root, model


def _post(conn, path, body, raw: bytes | None = None):
    conn.request("POST", path, body=raw if raw is not None else json.dumps(body),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read() or b"{}")


def _chat(content, **kw):
    return {"model": "a", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **kw}


def test_client_mistakes_are_4xx_on_one_kept_alive_connection(served, tmp_path):
    srv, root, _ = served
    host, port = srv.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    status, body = _post(conn, "/v1/chat/completions", _chat("hi", seed=2**70))
    assert status == 400 and body["error"]["param"] == "seed", body
    status, body = _post(conn, "/v1/chat/completions", None,
                         raw=b'{"model": "a", "messages": [{"role": "user", "content": "x\\ud800"}]}')
    assert status == 400 and "surrogate" in body["error"]["message"], body
    status, body = _post(conn, "/v1/completions", {"model": "a", "prompt": "ok", "seed": -1})
    assert status == 400 and body["error"]["param"] == "seed", body
    # a prompt longer than the context: 400 naming both limits, refused before any generation
    status, body = _post(conn, "/v1/chat/completions", _chat("word " * 300_000))
    assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
    assert "this model's context is" in body["error"]["message"] and "max_tokens is 4" in body["error"]["message"]
    status, body = _post(conn, "/v1/completions", {"model": "a", "prompt": "hello " * 600, "max_tokens": 4})  # tokenized: ~600 > 512
    assert status == 400 and "context is 512 tokens and max_tokens is 4" in body["error"]["message"], body
    # admin: a truncated adapter and a symlink out of the roots are refused, not loaded and not a 500
    bad = root / "truncated"
    shutil.copytree(root / "a", bad, ignore=shutil.ignore_patterns("checkpoint-*"))
    data = (bad / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    status, body = _post(conn, "/admin/adapters", {"name": "t", "path": "truncated"})
    assert status == 400 and "damaged" in body["error"]["message"], body
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(data)
    link = root / "linked"
    shutil.copytree(root / "a", link, ignore=shutil.ignore_patterns("checkpoint-*", "adapter_model.safetensors"))
    (link / "adapter_model.safetensors").symlink_to(outside)
    status, body = _post(conn, "/admin/adapters", {"name": "l", "path": "linked"})
    assert status in (400, 403) and "outside the allowed adapter roots" in body["error"]["message"], body
    # and the same connection still gets answers
    status, body = _post(conn, "/v1/chat/completions", _chat("hello"))
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant", body


def test_an_internal_error_is_a_500_and_the_connection_stays_usable(served, monkeypatch):
    srv, _, model = served
    real = model.generate_batch
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate_batch", broken)
    host, port = srv.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    status, body = _post(conn, "/v1/chat/completions", _chat("hello"))
    assert status == 500 and body["error"]["type"] == "server_error" and "boom" not in json.dumps(body)
    status, body = _post(conn, "/v1/chat/completions", _chat("hello"))  # same socket
    assert status == 200, body


def test_generation_is_bounded_in_time(tiny_llama):
    from loraforge.inference.generation import generation_config
    from loraforge.inference.settings import GenerationSettings

    assert generation_config(GenerationSettings(max_time=2.5), [0], 0).max_time == 2.5


@pytest.mark.parametrize("field,value", [
    ("max_tokens", "3"), ("max_tokens", True), ("temperature", "0.5"), ("seed", True), ("stream", "yes"),
    ("n", "1"), ("user", 5), ("stop", "\ud800"), ("presence_penalty", 0.5), ("tools", [{"type": "function"}]),
    ("response_format", {"type": "json_object"}), ("top_logprobs", 3), ("logit_bias", {"1": 5.0}),
    ("max_completion_tokens", 7),  # with max_tokens 4: they disagree
])
def test_values_a_lax_parser_would_coerce_or_ignore_are_400s_naming_the_field(served, field, value):
    """OpenAI's own API is strict about types and refuses what it cannot do; answering `"max_tokens": "3"` or a
    JSON-mode request with a guess would be a silent wrong answer."""
    srv = served[0]
    host, port = srv.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    status, err = _post(conn, "/v1/chat/completions", _chat("hello", **{field: value}))  # "\ud800" as its escape
    assert status == 400 and err["error"]["param"] == field, err
    status, ok = _post(conn, "/v1/chat/completions", _chat("hello"))  # same connection, still served
    assert status == 200, ok
