"""A real `loraforge serve` process with the embedded SmolLM2 (issue 22, point 6): SIGTERM during a long streamed
generation ends the process within seconds with a clean exit; a client that disconnects mid-stream stops its
generation, and the next request is answered promptly."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

PROMPT = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # greedy SmolLM2 keeps counting: a long generation


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server(tmp_path, smollm2_dir):
    port = _free_port()
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"base_model: {smollm2_dir}\nport: {port}\ndefault_temperature: 0\nscheduling: lock\n"
                   "shutdown_timeout_s: 1\nrequest_timeout_s: 300\n")
    log = open(tmp_path / "serve.log", "w+")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "loraforge", "serve", "--config", str(cfg)], stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            http.client.HTTPConnection("127.0.0.1", port, timeout=2).request("GET", "/health")
            break
        except OSError:
            assert proc.poll() is None, Path(log.name).read_text()
            time.sleep(0.3)
    yield proc, port, Path(log.name)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


def _start_stream(port: int, max_tokens: int = 1500) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({"model": "base", "prompt": PROMPT, "stream": True,
                                                             "max_tokens": max_tokens}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    for _ in range(3):  # generation is running: a few token events have arrived
        assert resp.readline().startswith(b"data: ")
        resp.readline()
    return conn, resp


def test_sigterm_during_a_long_stream_exits_promptly_and_cleanly(server):
    proc, port, log = server
    conn, resp = _start_stream(port)
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=30)
    took = time.monotonic() - start
    assert rc == 0, log.read_text()
    assert "shut down on SIGTERM" in log.read_text()
    assert took < 8, f"took {took:.1f}s to exit after SIGTERM\n{log.read_text()}"
    conn.close()


def test_a_client_that_disconnects_stops_its_generation(server):
    proc, port, log = server
    conn, resp = _start_stream(port)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    start = time.monotonic()
    c2 = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c2.request("POST", "/v1/completions", body=json.dumps({"model": "base", "prompt": "Hello", "max_tokens": 4}),
               headers={"Content-Type": "application/json"})
    r2 = c2.getresponse()
    body = json.loads(r2.read())
    took = time.monotonic() - start
    assert r2.status == 200, body
    assert took < 10, f"the second request waited {took:.1f}s behind the abandoned one"
    c2.request("GET", "/health")
    health = json.loads(c2.getresponse().read())
    assert health["cancelled"] >= 1, health
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    text = log.read_text()
    assert "client went away: stopped the generation after" in text, text
