"""loraforge vs the engine LLaMA-Factory trains with (HF `Trainer` + PEFT, padded batches), side by side, on two
workloads (`--cases`):

* `alpaca`: the 1,000 rows of alpaca_zh_demo (cutoff 512), LoRA r=8, alpha 16, dropout 0.05 on every linear layer,
  `--steps` optimizer steps of `--batch-size` examples: throughput (tokens/s), memory, MFU, start-up;
* `persona`: the shipped persona set (examples/data/persona/train.jsonl, 78 short rows), the article's settings
  (LoRA r=16, alpha 32, loraforge's default targets = every linear layer, batch 4, 3 epochs = 60 steps, lr 2e-4):
  end-to-end wall time (process start to the adapter saved) and peak RSS.

Same model (SmolLM2-135M) and tokenized examples (loraforge's encoder) for both engines, same global batch, steps,
learning rate, schedule and precision (bf16 autocast where the CPU has it). Both take *the same examples in the same
order*: the baseline's micro-batches are exactly loraforge's step plan (seed 42, epoch by epoch), so every optimizer
step does identical work and the per-step losses are comparable. Each run is its own subprocess (its own peak RSS,
`VmHWM`); runs alternate (baseline, loraforge, baseline, loraforge, ...) and medians are reported. loraforge runs
as its users run it: `loraforge train CONFIG` (the CLI, preflight included), inside the worker process.

Timing (the launcher notes the time just before it starts the subprocess):
* tokens/s: real (non-padding) tokens of steps 2..N / the time from the end of step 1 to the end of step N
  (torch's global optimizer post-step hook, identical for both engines);
* start-up: process start to the first forward call of any module (training begins);
* 1st step: process start to the end of the first optimizer step;
* wall: process start to the end of training (final adapter saved), the interpreter's exit left out.

MFU (benchmarks/mfu.py has the formula): tokens/s × training FLOPs per token ÷ this machine's matmul rate at the
model's own linear shapes, measured in the same invocation, with the runs' thread count, before the runs.
A profiled loraforge run (`--profile-steps`, not timed) adds the step-time breakdown of benchmarks/step_profile.py.

    OMP_NUM_THREADS=2 python benchmarks/train_throughput.py --threads 2 --steps 10 --repeats 2   # BENCHMARKS.md
    python benchmarks/train_throughput.py --cases alpaca --variant padded:batching=padded,chunked_loss=false

Extra `--variant NAME:key=value,...` runs add loraforge configurations (config keys) to every case's table: the
ladder in BENCHMARKS.md is made that way.
"""

from __future__ import annotations

import time

T_PROCESS = time.time()  # a worker's fallback for the launch time (before any heavy import)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mfu  # noqa: E402
import step_profile  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared/data/alpaca_zh_demo.json"
PERSONA_DATA = ROOT / "examples/data/persona/train.jsonl"
CASES = ("alpaca", "persona")


def case_config(case: str, args: argparse.Namespace, output_dir: str, **overrides: Any) -> dict[str, Any]:
    """The raw loraforge config of a case (its defaults, except what the comparison fixes)."""
    raw: dict[str, Any] = {
        "base_model": args.base_model, "task_type": "CAUSAL_LM", "method": "lora", "precision": args.precision,
        "seed": 42, "logging_steps": 1, "save_steps": None, "report_to": ["none"], "plot_loss": False,
        "output_dir": output_dir, "overwrite_output_dir": True, "lr_scheduler": "cosine", "warmup_steps": 0,
        "weight_decay": 0.0, "max_grad_norm": 1.0,
    }
    if case == "alpaca":
        raw.update({"metadata_path": str(args.data), "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.05,
                    "target_modules": "all-linear", "cutoff_len": args.cutoff, "batch_size": args.batch_size,
                    "gradient_accumulation_steps": args.accum, "max_steps": args.steps, "learning_rate": args.lr})
    else:  # the article's persona run: no target_modules (loraforge's default: every linear layer), 3 epochs
        raw.update({"metadata_path": str(PERSONA_DATA), "lora_rank": 16, "lora_alpha": 32, "batch_size": 4,
                    "epochs": 3, "learning_rate": 2e-4})
    raw.update(overrides)
    return raw


def plan_batches(cfg, lengths: list[int], steps: int) -> list[list[int]]:
    """The example indices of each micro-batch of the first `steps` optimizer steps, in loraforge's step-plan
    order (its padded view, epoch after epoch)."""
    from loraforge.data.batching import make_batches

    want = steps * cfg.gradient_accumulation_steps
    out: list[list[int]] = []
    epoch = 0
    while len(out) < want:
        batches = make_batches(lengths, cfg.batch_size, "padded", seed=cfg.seed, epoch=epoch, row_len=cfg.cutoff_len,
                               shuffle=True)
        out += [[i for row in b for i in row] for b in batches]
        epoch += 1
    return out[:want]


def total_steps(cfg, n_examples: int) -> int:
    """Optimizer steps of the run (max_steps, or whole epochs; the cases use no fractional epochs)."""
    per_epoch = math.ceil(math.ceil(n_examples / cfg.batch_size) / cfg.gradient_accumulation_steps)
    return cfg.max_steps or math.ceil(cfg.epochs) * per_epoch


class StepClock:
    """Wall time at the end of every optimizer step (torch's global post-step hook) and of the first forward call
    of any module (a global pre-hook that removes itself): the same for both engines."""

    def __init__(self) -> None:
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.times: list[float] = []
        self.first_forward: float | None = None
        register_optimizer_step_post_hook(lambda *_: self.times.append(time.time()))
        self._pre = torch.nn.modules.module.register_module_forward_pre_hook(self._forward)

    def _forward(self, *_):
        self.first_forward = time.time()
        self._pre.remove()


def worker(args: argparse.Namespace) -> None:
    """One run (in its own process); prints one JSON line with its measurements."""
    import torch

    from loraforge.estimate import peak_rss_bytes

    t_launch = args.t_launch or T_PROCESS
    torch.set_num_threads(args.threads)
    raw = json.loads(args.config)
    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="lf-bench-") as tmp:
        raw["output_dir"] = str(Path(tmp) / "run")
        profiler = _start_profiler(args.profile_steps) if args.profile_steps else None
        result = run_loraforge(raw, Path(tmp)) if args.engine == "loraforge" else run_baseline(raw, args)
        t_end = time.time()
        if profiler is not None:
            profiler.__exit__(None, None, None)
            result["profile"] = _profile_result(profiler, args.profile_steps)
    print("\nRESULT " + json.dumps({
        "engine": args.engine, "steps": len(clock.times), "step_times": [t - t_launch for t in clock.times],
        "startup_s": clock.first_forward - t_launch if clock.first_forward else None,
        "wall_s": t_end - t_launch, "peak_rss_mb": peak_rss_bytes() / 2**20,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        **result,
    }), flush=True)


def run_loraforge(raw: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """The real engine as a user runs it: `loraforge train CONFIG` (preflight, its defaults: packed, chunked loss...)."""
    import yaml

    from loraforge import cli

    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    sys.argv = ["loraforge", "train", str(config)]
    cli.main()
    run_dir = Path(raw["output_dir"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    run = json.loads((run_dir / "run.json").read_text())
    return {"losses": losses, "final_loss": run.get("final_loss"), "batching": run.get("batching"),
            "precision": run.get("precision"), "trainable": run.get("trainable_params")}


def run_baseline(raw: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """HF Trainer + PEFT get_peft_model + DataCollatorForSeq2Seq, as LLaMA-Factory's SFT stage sets them up; the
    adapter is saved at the end, as LLaMA-Factory does."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    from loraforge.config.loader import config_from_dict
    from loraforge.data.dataset import build_datasets
    from loraforge.models.gguf import resolve_model_path
    from loraforge.models.loader import load_tokenizer
    from loraforge.train.setup import resolve_precision

    cfg = config_from_dict(raw)
    precision = resolve_precision(cfg.precision)
    set_seed(cfg.seed)
    model_dir = resolve_model_path(cfg.base_model)
    tokenizer = load_tokenizer(model_dir)
    examples = build_datasets(cfg, tokenizer).train
    steps = total_steps(cfg, len(examples))
    batches = plan_batches(cfg, [len(e.input_ids) for e in examples], steps)
    rows = [{"input_ids": list(e.input_ids), "attention_mask": [1] * len(e.input_ids), "labels": list(e.labels)}
            for e in examples]

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                             lora_dropout=cfg.lora_dropout, target_modules="all-linear"))
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=8, label_pad_token_id=-100)
    with tempfile.TemporaryDirectory(prefix="hf-bench-") as out:
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps, max_steps=steps,
            learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=0, weight_decay=0.0,
            max_grad_norm=cfg.max_grad_norm, logging_steps=1, save_strategy="no", report_to=[],
            use_cpu=not torch.cuda.is_available(),
            bf16=precision == "bf16", gradient_checkpointing=False,
            dataloader_num_workers=0, remove_unused_columns=False, seed=cfg.seed, disable_tqdm=True)

        class PlanOrderTrainer(Trainer):
            # Exactly loraforge's micro-batches (a short last batch of an epoch included), so both engines see
            # the same examples at every step.
            def get_train_dataloader(self):
                return self.accelerator.prepare(DataLoader(rows, batch_sampler=batches, collate_fn=collator))

        trainer = PlanOrderTrainer(model=model, args=targs, train_dataset=rows, data_collator=collator)
        trainer.train()
        model.save_pretrained(Path(out) / "adapter")
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"losses": losses, "final_loss": losses[-1] if losses else None, "batching": "padded",
            "precision": precision, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def _start_profiler(active: int):
    """torch.profiler over optimizer steps 3 .. 2 + active (step 1 skipped, step 2 its warm-up), with the data and
    optimizer parts of loraforge's loop marked (benchmarks/step_profile.py groups by these ranges). A step ends
    when loraforge's `update` (clip, optimizer and scheduler step, zero_grad) returns."""
    from torch.profiler import ProfilerActivity, profile, record_function, schedule

    from loraforge.train import loop, setup

    collate, update = setup.Setup.collate, loop.update
    prof = profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=1, warmup=1, active=active, repeat=1))

    def marked_collate(self, *a, **k):
        with record_function("loraforge:data"):
            return collate(self, *a, **k)

    def marked_update(*a, **k):
        with record_function("loraforge:optimizer"):
            out = update(*a, **k)
        prof.step()
        return out

    setup.Setup.collate, loop.update = marked_collate, marked_update
    prof.__enter__()
    return prof


def _profile_result(prof, active: int) -> dict[str, Any]:
    events = prof.events()
    wall, shares = step_profile.breakdown(events)
    return {"wall_s": wall, "steps": active, "shares": shares}


def _parse_value(v: str) -> Any:
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def launch(args: argparse.Namespace, engine: str, raw: dict[str, Any], profile_steps: int = 0) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", engine, "--config", json.dumps(raw), "--threads", str(args.threads),
           "--profile-steps", str(profile_steps)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    t_launch = time.time()
    proc = subprocess.run(cmd + ["--t-launch", repr(t_launch)], capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"{engine} run failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


class Case:
    """One workload: its config, examples and step plan (to count each step's tokens), and its FLOPs per token."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        from loraforge.config.loader import config_from_dict
        from loraforge.data.dataset import build_datasets
        from loraforge.models.gguf import resolve_model_path
        from loraforge.models.loader import load_tokenizer

        self.name = name
        with tempfile.TemporaryDirectory() as tmp:
            self.raw = case_config(name, args, tmp)
            cfg = config_from_dict(self.raw)
            model_dir = resolve_model_path(cfg.base_model)
            # tokenized once up front (loraforge's cache) so neither engine's timing includes it
            data = build_datasets(cfg, load_tokenizer(model_dir))
        self.cfg, self.stats = cfg, data.stats
        lengths = [len(e.input_ids) for e in data.train]
        self.steps = total_steps(cfg, len(lengths))
        per_step = cfg.gradient_accumulation_steps
        planned = max(self.steps, 2 + args.profile_steps)  # the profiled run may run longer than the timed ones
        batches = plan_batches(cfg, lengths, planned)
        self.step_tokens = [sum(lengths[i] for mb in batches[s * per_step:(s + 1) * per_step] for i in mb)
                            for s in range(planned)]
        timed = [lengths[i] for mb in batches[per_step:self.steps * per_step] for i in mb]  # the examples of steps 2..N
        self.shapes = mfu.Shapes.of(model_dir)
        self.flops_per_token = mfu.flops_per_token(
            self.shapes, lora_rank=cfg.lora_rank, trained_share=self.stats.trained_tokens / self.stats.total_tokens,
            context=mfu.causal_context(timed))
        self.mean_length = sum(lengths) / len(lengths)
        self.matmul_tokens = round(cfg.batch_size * self.mean_length)  # a packed micro-batch's row

    def describe(self, args: argparse.Namespace) -> str:
        s = self.stats
        return (f"case {self.name}: {s.examples} examples, {s.total_tokens} tokens "
                f"({s.trained_tokens} trained), cutoff {self.cfg.cutoff_len}; {self.steps} steps × "
                f"{self.cfg.batch_size} × {self.cfg.gradient_accumulation_steps} examples, LoRA r{self.cfg.lora_rank} "
                f"alpha {self.cfg.lora_alpha:g}, {args.precision}, {args.threads} threads")


def measure(case: Case, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-run numbers from the worker's step times and the case's step plan."""
    out = []
    for r in runs:
        t, n = r["step_times"], len(r["step_times"])
        tokens = sum(case.step_tokens[1:n])
        out.append({**r, "tokens_per_s": tokens / (t[-1] - t[0]) if n > 1 else float("nan"),
                    "s_per_step": (t[-1] - t[0]) / (n - 1) if n > 1 else float("nan"),
                    "first_step_s": t[0] if t else float("nan")})
    return out


def summarize(name: str, case: Case, runs: list[dict[str, Any]], peak_tflops: float) -> dict[str, Any]:
    runs = measure(case, runs)
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    last = runs[-1]
    tok_s = med("tokens_per_s")
    return {"name": name, "tokens_per_s": tok_s, "s_per_step": med("s_per_step"), "first_step_s": med("first_step_s"),
            "startup_s": med("startup_s"), "wall_s": med("wall_s"), "peak_rss_mb": med("peak_rss_mb"),
            "final_loss": last["final_loss"], "mfu": tok_s * case.flops_per_token / (peak_tflops * 1e12),
            "peak_gpu_mb": statistics.median(r["peak_gpu_mb"] for r in runs) if last.get("peak_gpu_mb") else None,
            "mean_seq_tokens": case.mean_length,
            "batching": last["batching"], "precision": last["precision"], "trainable": last["trainable"],
            "runs": len(runs), "steps": last["steps"], "all_tokens_per_s": [round(r["tokens_per_s"], 1) for r in runs],
            "all_wall_s": [round(r["wall_s"], 1) for r in runs]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated, from: %(default)s")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="alpaca case: alpaca-format JSON (%(default)s)")
    p.add_argument("--base-model", default="smollm2", help="model for both engines (default: %(default)s)")
    p.add_argument("--steps", type=int, default=6, help="alpaca case: optimizer steps per run (the first is not timed)")
    p.add_argument("--batch-size", type=int, default=4, help="alpaca case: micro-batch size (examples)")
    p.add_argument("--accum", type=int, default=1, help="alpaca case: gradient accumulation steps")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="same for both; auto = loraforge's choice for this machine")
    p.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads per run (and for the matmul peak)")
    p.add_argument("--cutoff", type=int, default=512, help="alpaca case: cutoff_len")
    p.add_argument("--lr", type=float, default=2e-4, help="alpaca case: learning rate")
    p.add_argument("--repeats", type=int, default=1, help="alternating runs of each engine; medians reported")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:key=value,...",
                   help="extra loraforge run with these config overrides (repeatable)")
    p.add_argument("--no-baseline", action="store_true", help="only the loraforge runs")
    p.add_argument("--profile-steps", type=int, default=2,
                   help="steps of one extra, untimed loraforge run under torch.profiler per case (0: none)")
    p.add_argument("--json", type=Path, help="also write the summary here")
    p.add_argument("--worker", choices=["loraforge", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--config", default="", help=argparse.SUPPRESS)
    p.add_argument("--t-launch", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.engine = args.worker
        worker(args)
        return
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        p.error(f"--cases: unknown {', '.join(unknown)} (allowed: {', '.join(CASES)})")
    if args.precision == "auto":
        from loraforge.train.setup import resolve_precision

        args.precision = resolve_precision("auto")
    summary: dict[str, Any] = {"cases": {}}
    for name in cases:
        summary["cases"][name] = run_case(Case(name, args), args)
    if "alpaca" in summary["cases"]:
        summary["rows"] = summary["cases"]["alpaca"]["rows"]  # benchmarks/gpu_throughput.py reads these
    if args.json:
        summary["args"] = {k: str(v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps(summary, indent=1))


def run_case(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    print(case.describe(args), flush=True)
    dtype = "bfloat16" if args.precision == "bf16" else "float32"
    peak, rates = mfu.matmul_peak(case.shapes, case.matmul_tokens, threads=args.threads, dtype_name=dtype)
    print(f"matmul peak ({dtype}, {args.threads} threads, {case.matmul_tokens} tokens × the model's shapes): "
          f"{peak:.2f} TFLOP/s  [" + ", ".join(f"{k} {v:.2f}" for k, v in rates.items()) + "]; "
          f"model {case.flops_per_token / 1e6:.0f} MFLOP per token", flush=True)
    plans = ([("baseline (HF Trainer + PEFT, padded)", "baseline", {})] if not args.no_baseline else []) + \
        [("loraforge (defaults)", "loraforge", {})] + \
        [(v.split(":", 1)[0], "loraforge", _overrides(v)) for v in args.variant]
    runs: dict[str, list] = {name: [] for name, _, _ in plans}
    load = os.getloadavg()
    for r in range(args.repeats):
        for name, engine, overrides in plans:
            print(f"[{case.name} {r + 1}/{args.repeats}] {name} ...", file=sys.stderr, flush=True)
            runs[name].append(launch(args, engine, {**case.raw, **overrides}))
    profile = None
    if args.profile_steps:
        print(f"[{case.name}] profiling loraforge ...", file=sys.stderr, flush=True)
        raw = {**case.raw, "max_steps": 2 + args.profile_steps}
        profile = launch(args, "loraforge", raw, profile_steps=args.profile_steps)["profile"]
    load = (load, os.getloadavg())
    rows = [summarize(name, case, runs[name], peak) for name, _, _ in plans]
    report(case, rows, args, load, profile, peak)
    return {"rows": rows, "peak_tflops": peak, "matmul_rates": rates, "flops_per_token": case.flops_per_token,
            "profile": profile, "load": load}


def _overrides(variant: str) -> dict[str, Any]:
    setting = variant.split(":", 1)[1] if ":" in variant else ""
    return {k: _parse_value(v) for k, v in (kv.split("=", 1) for kv in setting.split(",") if kv)}


def report(case: Case, rows: list[dict[str, Any]], args: argparse.Namespace, load, profile, peak: float) -> None:
    base = rows[0] if not args.no_baseline else None
    ratio = lambda row, key: row[key] / base[key] if base else float("nan")  # noqa: E731
    print(f"load average before/after: {load[0][0]:.2f} / {load[1][0]:.2f} (1 min), {os.cpu_count()} CPUs")
    print(f"{'run':36} {'tok/s':>7} {'×':>5} {'MFU':>6} {'start-up s':>10} {'1st step s':>10} {'wall s':>7} {'×':>5} "
          f"{'peak RSS MB':>11} {'×':>5} {'final loss':>10} {'Δ':>7}  batching, runs")
    for row in rows:
        d = (row["final_loss"] - base["final_loss"]) / base["final_loss"] if base else float("nan")
        print(f"{row['name'][:36]:36} {row['tokens_per_s']:7.1f} {ratio(row, 'tokens_per_s'):5.2f} {row['mfu']:6.1%} "
              f"{row['startup_s']:10.1f} {row['first_step_s']:10.1f} {row['wall_s']:7.1f} {ratio(row, 'wall_s'):5.2f} "
              f"{row['peak_rss_mb']:11.0f} {ratio(row, 'peak_rss_mb'):5.2f} {row['final_loss']:10.4f} {d:+7.2%}  "
              f"{row['batching']} tok/s {row['all_tokens_per_s']} wall {row['all_wall_s']}")
    if base:
        for row in rows[1:]:
            if row["trainable"] != base["trainable"]:
                print(f"WARNING: {row['name']} trains {row['trainable']} parameters, the baseline {base['trainable']}")
    if profile:
        # what the matmuls achieved: the model's linear FLOPs of the profiled steps (3 .. 2 + steps) over the
        # time the matmul group took
        tokens = sum(case.step_tokens[2:2 + profile["steps"]])
        linear = mfu.flops_per_token(case.shapes, lora_rank=case.cfg.lora_rank, context=0.0,
                                     trained_share=case.stats.trained_tokens / case.stats.total_tokens)
        matmul_s = profile["shares"]["matmul"] * profile["wall_s"]
        profile["matmul_tflops"] = tokens * linear / matmul_s / 1e12 if matmul_s else float("nan")
        print("loraforge step profile: " + step_profile.format_breakdown(profile["wall_s"], profile["steps"],
                                                                         profile["shares"], profile["matmul_tflops"]))


if __name__ == "__main__":
    main()
