"""loraforge vs the engine LLaMA-Factory trains with (HF `Trainer` + PEFT, padded batches), side by side.

Same model (SmolLM2-135M), same LoRA (r=8, alpha 16, dropout 0.05, every linear layer), same tokenized
examples (loraforge's encoder, cutoff 512), same global batch, steps, learning rate, schedule and precision.
Both runs take the *same examples in the same random order*: the baseline's micro-batches are the padded
micro-batches of loraforge's step plan (seed 42, epoch 0), so every optimizer step does identical work and the
per-step losses are comparable. Each run is its own subprocess (peak RSS per run); runs alternate
(baseline, loraforge, baseline, loraforge, ...) to spread the shared machine's noise, and medians are reported.

Timing is taken with a global optimizer-step hook (identical for both engines):
* tokens/s: real (non-padding) tokens of steps 2..N / the time from the end of step 1 to the end of step N;
* first step: seconds from process start (before `import torch`) to the end of the first optimizer step.

    OMP_NUM_THREADS=1 python benchmarks/train_throughput.py --steps 10 --repeats 2   # as in BENCHMARKS.md
    python benchmarks/train_throughput.py --variant padded:batching=padded,chunked_loss=false

Extra `--variant NAME:key=value,...` runs add loraforge configurations (config keys) to the table: the ladder
in BENCHMARKS.md is made that way.
"""

from __future__ import annotations

import time

T_PROCESS = time.time()  # before any heavy import: "time to first step" includes importing torch

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared/data/alpaca_zh_demo.json"


def base_config(args: argparse.Namespace, output_dir: str, **overrides: Any):
    """The loraforge config both runs are derived from (its defaults, except what the comparison fixes)."""
    from loraforge.config.loader import config_from_dict

    raw = {
        "base_model": args.base_model, "task_type": "CAUSAL_LM", "metadata_path": str(args.data),
        "method": "lora", "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear",
        "cutoff_len": args.cutoff, "batch_size": args.batch_size,
        "gradient_accumulation_steps": args.accum, "max_steps": args.steps, "learning_rate": args.lr,
        "lr_scheduler": "cosine", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
        "precision": args.precision, "seed": 42, "logging_steps": 1, "save_steps": None, "report_to": ["none"],
        "plot_loss": False, "output_dir": output_dir, "overwrite_output_dir": True,
    }
    raw.update(overrides)
    return config_from_dict(raw)


def plan_batches(cfg, lengths: list[int]) -> list[list[int]]:
    """The example indices of each micro-batch, in loraforge's step-plan order (padded view, epoch 0)."""
    from loraforge.data.batching import make_batches

    batches = make_batches(lengths, cfg.batch_size, "padded", seed=cfg.seed, epoch=0, row_len=cfg.cutoff_len,
                           shuffle=True)
    return [[i for row in b for i in row] for b in batches]


class StepClock:
    """Wall time at the end of every optimizer step, through torch's global post-step hook (both engines)."""

    def __init__(self) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.times: list[float] = []
        self._handle = register_optimizer_step_post_hook(
            lambda *_: self.times.append(time.time()))


def worker(args: argparse.Namespace) -> None:
    """One run (in its own process); prints one JSON line with its measurements."""
    import torch

    from loraforge.estimate import peak_rss_bytes

    torch.set_num_threads(args.threads)
    overrides = dict(kv.split("=", 1) for kv in args.set.split(",")) if args.set else {}
    overrides = {k: _parse_value(v) for k, v in overrides.items()}
    with tempfile.TemporaryDirectory(prefix="lf-bench-") as tmp:
        cfg = base_config(args, tmp, **overrides)
        clock = StepClock()
        if args.engine == "loraforge":
            result = run_loraforge(cfg)
        else:
            result = run_baseline(cfg, args)
        from loraforge.data.dataset import build_datasets
        from loraforge.models.gguf import resolve_model_path
        from loraforge.models.loader import load_tokenizer

        examples = build_datasets(cfg, load_tokenizer(resolve_model_path(cfg.base_model))).train  # cache hit
    batches = plan_batches(cfg, [len(e.input_ids) for e in examples])
    per_step = cfg.gradient_accumulation_steps  # micro-batches per optimizer step
    steps = len(clock.times)
    tokens = [sum(len(examples[i].input_ids) for mb in batches[s * per_step:(s + 1) * per_step] for i in mb)
              for s in range(steps)]
    timed = clock.times[-1] - clock.times[0] if steps > 1 else float("nan")
    print("RESULT " + json.dumps({
        "engine": args.engine, "set": args.set, "steps": steps,
        "tokens_per_s": sum(tokens[1:]) / timed if steps > 1 else None,
        "s_per_step": timed / (steps - 1) if steps > 1 else None,
        "first_step_s": clock.times[0] - T_PROCESS if steps else None,
        "peak_rss_mb": peak_rss_bytes() / 2**20,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "tokens": sum(tokens), "sequences": sum(len(mb) for mb in batches[:steps * per_step]),
        **result,
    }), flush=True)


def run_loraforge(cfg) -> dict[str, Any]:
    """The real engine, with its defaults (batching auto → packed, chunked loss, ...)."""
    from loraforge.train.loop import train

    result = train(cfg, echo=lambda _m: None)
    losses = [json.loads(line)["loss"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    run = json.loads((result.run_dir / "run.json").read_text())
    return {"losses": losses, "final_loss": result.final_loss, "batching": run.get("batching"),
            "precision": run.get("precision"), "trainable": run.get("trainable_params"),
            "attention": run.get("attention")}


def run_baseline(cfg, args: argparse.Namespace) -> dict[str, Any]:
    """HF Trainer + PEFT get_peft_model + DataCollatorForSeq2Seq, as LLaMA-Factory's SFT stage sets them up."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    from loraforge.data.dataset import build_datasets
    from loraforge.models.gguf import resolve_model_path
    from loraforge.models.loader import load_tokenizer
    from loraforge.train.setup import resolve_precision

    precision = resolve_precision(cfg.precision)
    set_seed(cfg.seed)
    model_dir = resolve_model_path(cfg.base_model)
    tokenizer = load_tokenizer(model_dir)
    examples = build_datasets(cfg, tokenizer).train
    order = [i for mb in plan_batches(cfg, [len(e.input_ids) for e in examples]) for i in mb]
    rows = [{"input_ids": list(examples[i].input_ids), "attention_mask": [1] * len(examples[i].input_ids),
             "labels": list(examples[i].labels)} for i in order]

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                             lora_dropout=cfg.lora_dropout, target_modules="all-linear"))
    with tempfile.TemporaryDirectory(prefix="hf-bench-") as out:
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps, max_steps=cfg.max_steps,
            learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=0, weight_decay=0.0,
            max_grad_norm=cfg.max_grad_norm, logging_steps=1, save_strategy="no", report_to=[],
            use_cpu=not torch.cuda.is_available(),
            bf16=precision == "bf16", train_sampling_strategy="random", gradient_checkpointing=False,
            dataloader_num_workers=0, remove_unused_columns=False, seed=cfg.seed, disable_tqdm=True)

        class PlanOrderTrainer(Trainer):
            # The rows are already in a random order (loraforge's plan): read them as they are, so both engines
            # see the same examples at every step.
            def _get_train_sampler(self, *a, **k):
                return SequentialSampler(self.train_dataset)

        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=8, label_pad_token_id=-100)
        trainer = PlanOrderTrainer(model=model, args=targs, train_dataset=_ListDataset(rows), data_collator=collator)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"losses": losses, "final_loss": losses[-1] if losses else None, "batching": "padded",
            "precision": precision, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


class _ListDataset:
    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def _parse_value(v: str) -> Any:
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def launch(args: argparse.Namespace, engine: str, setting: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", engine, "--set", setting, "--data", str(args.data),
           "--base-model", str(args.base_model),
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--accum", str(args.accum),
           "--precision", args.precision, "--threads", str(args.threads), "--cutoff", str(args.cutoff),
           "--lr", str(args.lr)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"{engine} run failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def summarize(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    last = runs[-1]
    tail = last["losses"][len(last["losses"]) // 2:]
    return {"name": name, "tokens_per_s": med("tokens_per_s"), "s_per_step": med("s_per_step"),
            "first_step_s": med("first_step_s"), "peak_rss_mb": med("peak_rss_mb"), "final_loss": last["final_loss"],
            "peak_gpu_mb": statistics.median(r["peak_gpu_mb"] for r in runs) if last.get("peak_gpu_mb") else None,
            "mean_seq_tokens": last["tokens"] / max(last["sequences"], 1),
            "tail_loss": sum(tail) / len(tail), "batching": last["batching"], "precision": last["precision"],
            "trainable": last["trainable"], "runs": len(runs),
            "all_tokens_per_s": [round(r["tokens_per_s"], 1) for r in runs]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="alpaca-format JSON (default: %(default)s)")
    p.add_argument("--base-model", default="smollm2", help="model for both engines (default: %(default)s)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is not timed)")
    p.add_argument("--batch-size", type=int, default=4, help="micro-batch size (examples)")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="same for both; auto = loraforge's choice for this machine")
    p.add_argument("--threads", type=int, default=1,
                   help="torch / OpenMP threads per run (1: on a loaded 2-core machine 2 threads ran 4× slower)")
    p.add_argument("--cutoff", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--repeats", type=int, default=1, help="alternating runs of each engine; medians reported")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:key=value,...",
                   help="extra loraforge run with these config overrides (repeatable)")
    p.add_argument("--no-baseline", action="store_true", help="only the loraforge runs")
    p.add_argument("--json", type=Path, help="also write the summary here")
    p.add_argument("--worker", choices=["loraforge", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--set", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.engine = args.worker
        worker(args)
        return
    if args.precision == "auto":
        from loraforge.train.setup import resolve_precision

        args.precision = resolve_precision("auto")
    _warm_tokenized_cache(args)

    plans = ([("baseline (HF Trainer + PEFT, padded)", "baseline", "")] if not args.no_baseline else []) + \
        [("loraforge (defaults)", "loraforge", "")] + \
        [(v.split(":", 1)[0], "loraforge", v.split(":", 1)[1] if ":" in v else "") for v in args.variant]
    runs: dict[str, list] = {name: [] for name, _, _ in plans}
    load = os.getloadavg()
    for r in range(args.repeats):
        for name, engine, setting in plans:
            print(f"[{r + 1}/{args.repeats}] {name} ...", file=sys.stderr, flush=True)
            runs[name].append(launch(args, engine, setting))
    load = (load, os.getloadavg())
    rows = [summarize(name, runs[name]) for name, _, _ in plans]
    report(rows, args, load)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "load": load, "args": {k: str(v) for k, v in vars(args).items()}},
                                        indent=1))


def _warm_tokenized_cache(args: argparse.Namespace) -> None:
    """Tokenize once up front so neither engine's timing includes it (both read the same cached examples)."""
    from loraforge.data.dataset import build_datasets
    from loraforge.models.gguf import resolve_model_path
    from loraforge.models.loader import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = base_config(args, tmp)
        data = build_datasets(cfg, load_tokenizer(resolve_model_path(cfg.base_model)))
    s = data.stats
    print(f"data: {len(data.train)} examples, {s.total_tokens} tokens ({s.trained_tokens} trained), cutoff "
          f"{args.cutoff}; {args.steps} steps × {args.batch_size} × {args.accum} examples, {args.precision}, "
          f"{args.threads} threads", flush=True)


def report(rows: list[dict[str, Any]], args: argparse.Namespace, load) -> None:
    base = rows[0] if not args.no_baseline else None
    print(f"load average before/after: {load[0][0]:.2f} / {load[1][0]:.2f} (1 min), {os.cpu_count()} CPUs")
    head = f"{'run':40} {'tok/s':>8} {'×':>6} {'s/step':>7} {'1st step s':>10} {'peak RSS MB':>11} {'×':>6} " \
           f"{'final loss':>10} {'Δ':>7}  batching"
    print(head)
    for row in rows:
        x = row["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        m = row["peak_rss_mb"] / base["peak_rss_mb"] if base else float("nan")
        d = (row["final_loss"] - base["final_loss"]) / base["final_loss"] if base else float("nan")
        print(f"{row['name'][:40]:40} {row['tokens_per_s']:8.1f} {x:6.2f} {row['s_per_step']:7.2f} "
              f"{row['first_step_s']:10.1f} {row['peak_rss_mb']:11.0f} {m:6.2f} {row['final_loss']:10.4f} "
              f"{d:+7.2%}  {row['batching']} {row['all_tokens_per_s']}")
    if base:
        for row in rows[1:]:
            if row["trainable"] != base["trainable"]:
                print(f"WARNING: {row['name']} trains {row['trainable']} parameters, the baseline {base['trainable']}")


if __name__ == "__main__":
    main()
