"""Per-process peak memory of 1 process, 2-process DDP and 2-process FSDP2 on the same model, next to
`loraforge estimate --processes N --sharding S`.

The model is SmolLM2-135M trained with `method: full` (fp32): its weights, gradients and AdamW moments
(~2.1 GB) dominate the fixed footprint of a process (Python + torch + transformers, ~0.45 GB), so what sharding
saves is visible. The micro-batch is short (batch 1, cutoff 64) to keep activations small and the run fast.

Every run is started the way users start it (FSDP2 and DDP under `torchrun --nproc_per_node 2`, one process as
a plain Python process) and trains `--steps` optimizer steps with `save_steps` off. Each process records its
own peak RSS (`VmHWM`) after every optimizer step (torch's global optimizer-step hook); the "training" peak is
the value after the last step, which is what `estimate` models. The process's peak at exit (after the final
save, where FSDP2's rank 0 gathers the consolidated model) is printed next to it.

    OMP_NUM_THREADS=1 python benchmarks/fsdp_memory.py            # as in BENCHMARKS.md
    python benchmarks/fsdp_memory.py --runs fsdp2 --processes 2    # one run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20


def raw_config(args: argparse.Namespace, data: Path, out: Path, sharding: str) -> dict:
    return {"base_model": args.base_model, "metadata_path": str(data), "output_dir": str(out),
            "overwrite_output_dir": True, "method": args.method, "precision": "fp32", "batch_size": args.batch_size,
            "cutoff_len": args.cutoff, "max_steps": args.steps, "learning_rate": 1e-5, "lr_scheduler": "constant",
            "save_steps": None, "logging_steps": 1, "report_to": ["none"], "plot_loss": False,
            "tokenized_cache": False, "sharding": sharding, "seed": 0}


def write_data(path: Path, n: int) -> Path:
    """n alpaca rows of about the same length (every micro-batch ~ the same number of tokens)."""
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"instruction": f"Question {i}: how much water should an adult drink a day?",
                                "input": "", "output": "About two litres, more in hot weather or with exercise."})
                    + "\n")
    return path


def child(config_json: str, result_prefix: str) -> None:
    """One process of a run: train, record VmHWM after every optimizer step, write `<prefix>.<rank>.json`."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from loraforge.config import config_from_dict
    from loraforge.estimate import peak_rss_bytes
    from loraforge.train.loop import train

    per_step: list[int] = []
    register_optimizer_step_post_hook(lambda *_: per_step.append(peak_rss_bytes()))
    rank = int(os.environ.get("RANK", "0"))
    train(config_from_dict(json.loads(config_json)), echo=print if rank == 0 else (lambda _m: None))
    Path(f"{result_prefix}.{rank}.json").write_text(json.dumps(
        {"rank": rank, "per_step": per_step, "at_exit": peak_rss_bytes()}))


def launch(args: argparse.Namespace, name: str, processes: int, sharding: str, tmp: Path, data: Path) -> list[dict]:
    raw = raw_config(args, data, tmp / f"out-{name}", sharding)
    prefix = tmp / f"result-{name}"
    me = [str(Path(__file__).resolve()), "--child", json.dumps(raw), str(prefix)]
    cmd = [sys.executable, *me] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
         "--master_port", str(args.port), *me]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        sys.exit(f"{name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    for line in proc.stdout.splitlines():
        if line.startswith("FSDP2:") or "optimizer steps" in line:
            print(f"  [{name}] {line}")
    return [json.loads(Path(f"{prefix}.{r}.json").read_text()) for r in range(processes)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", nargs=2, metavar=("CONFIG_JSON", "RESULT_PREFIX"), help=argparse.SUPPRESS)
    p.add_argument("--base-model", default="smollm2")
    p.add_argument("--method", default="full")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--runs", default="one,ddp,fsdp2", help="comma-separated: one, ddp, fsdp2")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--cutoff", type=int, default=64)
    p.add_argument("--port", type=int, default=29533)
    p.add_argument("--timeout", type=int, default=900)
    args = p.parse_args(argv)
    if args.child:
        child(*args.child)
        return

    from loraforge.config import config_from_dict
    from loraforge.estimate import estimate_memory, format_estimate

    n = args.processes
    runs = {"one": (1, "ddp"), "ddp": (n, "ddp"), "fsdp2": (n, "fsdp2")}
    rows = []
    with tempfile.TemporaryDirectory(prefix="lf-fsdp-mem-") as tmp_name:
        tmp = Path(tmp_name)
        data = write_data(tmp / "train.jsonl", 4 * n * args.batch_size * args.steps)
        baseline = None
        for name in args.runs.split(","):
            processes, sharding = runs[name]
            measured = launch(args, name, processes, sharding, tmp, data)
            cfg = config_from_dict(raw_config(args, data, tmp / "unused", sharding))
            est = estimate_memory(cfg, device="cpu", processes=processes, sharding=sharding, baseline_bytes=baseline)
            baseline = est.overhead_bytes  # measured once (a fresh Python importing the stack)
            print(f"\n== {name}: loraforge estimate --processes {processes} --sharding {sharding}")
            print(format_estimate(est))
            for m in measured:
                train_peak = m["per_step"][-1]
                rows.append((name, processes, m["rank"], train_peak, m["at_exit"], est.peak_bytes))
    print(f"\nmodel {args.base_model}, method {args.method}, fp32, batch {args.batch_size} x cutoff {args.cutoff}, "
          f"{args.steps} steps, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}")
    print(f"{'run':<6} {'procs':>5} {'rank':>4} {'train peak MiB':>15} {'at exit MiB':>12} {'estimate MiB':>13} "
          f"{'est/measured':>13}")
    for name, processes, rank, peak, at_exit, est in rows:
        print(f"{name:<6} {processes:>5} {rank:>4} {peak / MiB:>15,.0f} {at_exit / MiB:>12,.0f} {est / MiB:>13,.0f} "
              f"{100 * (est / peak - 1):>+12.1f}%")
    one = [r for r in rows if r[0] == "one"]
    fsdp = [r for r in rows if r[0] == "fsdp2"]
    if one and fsdp:
        worst = max(r[3] for r in fsdp)
        print(f"FSDP2 x{n}: the largest per-process training peak is {worst / one[0][3]:.2f}x one process's")


if __name__ == "__main__":
    main()
