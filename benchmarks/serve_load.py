"""Load test for `loraforge serve`: N concurrent OpenAI clients mixing two adapters and the base model.

Prints requests/s and p50/p95 latency for each scheduling strategy (`batch`: concurrent requests share
one generate call with per-row adapters; `lock`: one request at a time), and checks that every answer came
from the adapter it asked for (the demo adapters answer CARDIO-7 / GLUCO-3; the base says neither).

    OMP_NUM_THREADS=1 python benchmarks/serve_load.py --clients 16 --requests 8
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def run_load(url: str, key: str | None, clients: int, requests: int, max_tokens: int) -> dict:
    from openai import OpenAI

    from loraforge.serve.demo import DEMO_ANSWERS

    names = ["cardiology", "diabetes", "base"]

    def owner(text: str) -> str:
        hits = [n for n, code in DEMO_ANSWERS.items() if code in text]
        return hits[0] if len(hits) == 1 else ("base" if not hits else "?")

    def worker(i: int) -> list[tuple[float, bool, bool]]:
        client = OpenAI(base_url=url + "/v1", api_key=key or "none", max_retries=0, timeout=900)
        out = []
        for j in range(requests):
            name = names[(i + j) % len(names)]
            q = [{"role": "user", "content": f"Question {i}-{j}: how should I take care of myself?"}]
            start = time.perf_counter()
            try:
                reply = client.chat.completions.create(model=name, messages=q, max_tokens=max_tokens, temperature=0)
                ok, right = True, owner(reply.choices[0].message.content or "") == name
            except Exception:  # counted, not raised: the report says how many failed
                ok, right = False, False
            out.append((time.perf_counter() - start, ok, right))
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        rows = [r for part in pool.map(worker, range(clients)) for r in part]
    wall = time.perf_counter() - start
    lat = sorted(r[0] for r in rows)
    return {"requests": len(rows), "errors": sum(not r[1] for r in rows),
            "wrong_adapter": sum(r[1] and not r[2] for r in rows), "wall_s": wall, "rps": len(rows) / wall,
            "p50_s": statistics.median(lat), "p95_s": lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))]}


def main() -> None:
    import torch

    from loraforge.inference import InferenceModel
    from loraforge.serve.app import create_app
    from loraforge.serve.background import BackgroundServer
    from loraforge.serve.config import ServerConfig
    from loraforge.serve.demo import default_demo_dir, train_demo_adapters

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="smollm2")
    ap.add_argument("--adapters-dir", type=Path, default=None, help="where the demo adapters are trained/cached")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=8, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=10)
    ap.add_argument("--modes", nargs="+", default=["batch", "lock"], choices=["batch", "lock"])
    args = ap.parse_args()

    adapters_dir = args.adapters_dir or default_demo_dir(args.base)
    adapters = train_demo_adapters(args.base, adapters_dir)
    model = InferenceModel.load(args.base, {k: str(v) for k, v in adapters.items()})
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.clients} clients x {args.requests} requests, max_tokens {args.max_tokens}, greedy")
    print(f"{'scheduling':<10} {'req':>4} {'errors':>6} {'wrong':>5} {'req/s':>7} {'p50 s':>7} {'p95 s':>7} {'mean batch':>10}")
    results = {}
    for mode in args.modes:
        config = ServerConfig(base_model=args.base, scheduling=mode, max_batch_size=args.clients, default_temperature=0)
        with BackgroundServer(create_app(config, model)) as srv:
            run_load(srv.url, None, 3, 1, args.max_tokens)  # warm-up: first-call overheads out of the timing
            app_state = srv.server.config.app.state.loraforge
            app_state.pool.batches = app_state.pool.rows = 0
            r = run_load(srv.url, None, args.clients, args.requests, args.max_tokens)
            r["mean_batch"] = app_state.pool.stats()["mean_batch"] or 1.0
        results[mode] = r
        print(f"{mode:<10} {r['requests']:>4} {r['errors']:>6} {r['wrong_adapter']:>5} {r['rps']:>7.2f} "
              f"{r['p50_s']:>7.2f} {r['p95_s']:>7.2f} {r['mean_batch']:>10}")
    if {"batch", "lock"} <= set(results):
        print(f"batch / lock throughput: {results['batch']['rps'] / results['lock']['rps']:.2f}x")


if __name__ == "__main__":
    main()
