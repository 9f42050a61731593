"""loraforge DPO vs TRL's `DPOTrainer` + PEFT, side by side on the same pairs, steps and precision.

Both: SmolLM2-135M (the embedded model), LoRA r=8, alpha 16, dropout 0.05 on every linear layer, the reference =
the base with the adapter disabled (TRL's default `disable_dropout` is turned off when `--lora-dropout` > 0, so
both really train with it), sigmoid DPO with beta 0.1, lr 2e-4 cosine without warmup, 4 pairs per optimizer
step, `--precision auto` (bf16 autocast where the CPU has bf16 instructions, else fp32), the pairs of `examples/data/preference/train.jsonl` as chat rows (TRL renders
them with the same chat template; the token counts of both are printed and must agree). Both take *the same
pairs in the same order*: TRL's rows are ordered by loraforge's step plan (seed 42, epoch 0) and read
sequentially, so every optimizer step does the same work and the per-step losses are comparable.

Each run is its own subprocess (its own peak RSS, `VmHWM`); runs alternate TRL, loraforge, TRL, … and medians
are reported. tokens/s counts the real tokens (prompt + reply, both sides) of steps 2..N over the time from the
end of step 1 to the end of step N (torch's global optimizer post-step hook, the same for both).

    OMP_NUM_THREADS=2 python benchmarks/dpo_vs_trl.py --steps 6 --repeats 2     # as in BENCHMARKS.md
"""

from __future__ import annotations

import time

T_PROCESS = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "preference" / "train.jsonl"


def config(args: argparse.Namespace, output_dir: str):
    from loraforge.config import config_from_dict

    return config_from_dict({
        "base_model": "smollm2", "stage": "dpo", "dpo_loss": "sigmoid", "pref_beta": 0.1,
        "metadata_path": str(args.data), "method": "lora", "lora_rank": 8, "lora_alpha": 16, "lora_dropout": args.lora_dropout,
        "target_modules": "all-linear", "batch_size": args.batch_size, "max_steps": args.steps,
        "learning_rate": 2e-4, "lr_scheduler": "cosine", "warmup_steps": 0, "weight_decay": 0.0,
        "max_grad_norm": 1.0, "precision": args.precision, "seed": 42, "logging_steps": 1, "save_steps": None,
        "report_to": ["none"], "plot_loss": False, "tokenized_cache": False, "output_dir": output_dir})


def plan(cfg) -> tuple[list, list[list[int]]]:
    """loraforge's encoded pairs and the pair indices of each step (its padded plan; packed runs pack the same
    micro-batches into one row each)."""
    from loraforge.data.batching import make_batches
    from loraforge.data.preference import build_preference_data
    from loraforge.models.gguf import resolve_model_path
    from loraforge.models.loader import load_tokenizer

    pairs = build_preference_data(cfg, load_tokenizer(resolve_model_path(cfg.base_model))).train
    batches = make_batches([len(p.input_ids) for p in pairs], cfg.batch_size, "padded", seed=cfg.seed, epoch=0,
                           row_len=cfg.cutoff_len)
    return pairs, [[i for row in b for i in row] for b in batches]


def worker(args: argparse.Namespace) -> None:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from loraforge.estimate import peak_rss_bytes

    torch.set_num_threads(args.threads)
    times: list[float] = []
    register_optimizer_step_post_hook(lambda *_: times.append(time.time()))
    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as tmp:
        cfg = config(args, tmp)
        result = (run_loraforge if args.worker == "loraforge" else run_trl)(cfg, args)
    steps = len(times)
    tokens = result.pop("step_tokens")[:steps]
    timed = times[-1] - times[0]
    print("RESULT " + json.dumps({
        "engine": args.worker, "steps": steps, "tokens_per_s": sum(tokens[1:]) / timed, "s_per_step": timed / (steps - 1),
        "first_step_s": times[0] - T_PROCESS, "peak_rss_mb": peak_rss_bytes() / 2**20, "tokens": sum(tokens),
        **result}), flush=True)


def run_loraforge(cfg, args) -> dict[str, Any]:
    from loraforge.train.loop import train

    pairs, steps = plan(cfg)
    result = train(cfg, echo=lambda _m: None)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    run = json.loads((result.run_dir / "run.json").read_text())
    return {"losses": [r["loss"] for r in records if "loss" in r],
            "margins": [r["rewards/margins"] for r in records if "loss" in r],
            "step_tokens": [sum(len(pairs[i].input_ids) for i in s) for s in steps],
            "batching": run.get("batching"), "precision": run.get("precision"),
            "trainable": run.get("trainable_params")}


def run_trl(cfg, args) -> dict[str, Any]:
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, set_seed

    from loraforge.data.preference import load_preference_rows
    from loraforge.models.gguf import resolve_model_path
    from loraforge.models.loader import load_tokenizer
    from loraforge.train.setup import resolve_precision

    set_seed(cfg.seed)
    _, steps = plan(cfg)
    rows = load_preference_rows([Path(cfg.metadata_path)], cfg)
    ordered = [rows[i] for s in steps for i in s]
    data = Dataset.from_list([{"prompt": r.prompt, "chosen": [{"role": "assistant", "content": r.chosen}],
                               "rejected": [{"role": "assistant", "content": r.rejected}]} for r in ordered])
    model_dir = resolve_model_path(cfg.base_model)
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft = LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout, target_modules="all-linear")
    with tempfile.TemporaryDirectory(prefix="trl-bench-") as out:
        targs = trl.DPOConfig(
            output_dir=out, per_device_train_batch_size=cfg.batch_size, max_steps=cfg.max_steps,
            learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=0, weight_decay=0.0,
            max_grad_norm=cfg.max_grad_norm, beta=cfg.pref_beta, loss_type=["sigmoid"], logging_steps=1,
            save_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(),
            bf16=resolve_precision(cfg.precision) == "bf16", seed=cfg.seed, disable_tqdm=True,
            dataloader_num_workers=0, max_length=None,
            # TRL turns every dropout off by default; the same hyper-parameters means PEFT's LoRA dropout runs
            disable_dropout=cfg.lora_dropout == 0)

        class PlanOrderDPOTrainer(trl.DPOTrainer):
            def _get_train_sampler(self, *a, **k):  # rows are already in loraforge's step order
                return SequentialSampler(self.train_dataset)

        trainer = PlanOrderDPOTrainer(model=model, args=targs, train_dataset=data, processing_class=tokenizer,
                                      peft_config=peft)
        ds = trainer.train_dataset
        lens = [2 * len(p) + len(c) + len(r) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
        trainer.train()
        hist = trainer.state.log_history
    n = cfg.batch_size
    return {"losses": [h["loss"] for h in hist if "loss" in h],
            "margins": [h.get("rewards/margins") for h in hist if "loss" in h],
            "step_tokens": [sum(lens[k:k + n]) for k in range(0, len(lens), n)], "batching": "padded",
            "precision": "bf16" if targs.bf16 else "fp32",
            "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}


def launch(args: argparse.Namespace, engine: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", engine, "--steps", str(args.steps), "--batch-size",
           str(args.batch_size), "--precision", args.precision, "--threads", str(args.threads), "--data", str(args.data),
           "--lora-dropout", str(args.lora_dropout)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"{engine} run failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is not timed)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per optimizer step")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--lora-dropout", type=float, default=0.05,
                   help="0 makes both engines deterministic, so their loss curves can be compared step by step")
    p.add_argument("--worker", choices=["loraforge", "trl"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.precision == "auto":
        from loraforge.train.setup import resolve_precision

        args.precision = resolve_precision("auto")
    if args.worker:
        worker(args)
        return
    runs: dict[str, list] = {"trl": [], "loraforge": []}
    load = os.getloadavg()[0]
    for r in range(args.repeats):
        for engine in runs:
            print(f"[{r + 1}/{args.repeats}] {engine} ...", file=sys.stderr, flush=True)
            runs[engine].append(launch(args, engine))
    med = {e: {k: statistics.median(x[k] for x in rs) for k in ("tokens_per_s", "s_per_step", "first_step_s",
                                                                "peak_rss_mb")} for e, rs in runs.items()}
    print(f"{args.steps} steps × {args.batch_size} pairs, {args.precision}, {args.threads} threads; load average "
          f"{load:.2f} → {os.getloadavg()[0]:.2f}")
    print(f"{'engine':34} {'tok/s':>7} {'×':>5} {'s/step':>7} {'1st step s':>10} {'peak RSS MB':>11} {'×':>5}  tokens  runs tok/s")
    names = {"trl": "TRL DPOTrainer + PEFT", "loraforge": "loraforge stage: dpo"}
    for e, m in med.items():
        t, b = runs[e][-1], med["trl"]
        print(f"{names[e] + ' (' + t['batching'] + ')':34} {m['tokens_per_s']:7.1f} {m['tokens_per_s'] / b['tokens_per_s']:5.2f} "
              f"{m['s_per_step']:7.2f} {m['first_step_s']:10.1f} {m['peak_rss_mb']:11.0f} "
              f"{m['peak_rss_mb'] / b['peak_rss_mb']:5.2f}  {t['tokens']}  {[round(x['tokens_per_s'], 1) for x in runs[e]]}")
    print("loss per step:")
    for e in runs:
        print(f"  {e:10} " + " ".join(f"{x:.4f}" for x in runs[e][-1]["losses"]))
    print("rewards/margins per step:")
    for e in runs:
        print(f"  {e:10} " + " ".join(f"{x:+.4f}" for x in runs[e][-1]["margins"] if x is not None))
    if runs["trl"][-1]["trainable"] != runs["loraforge"][-1]["trainable"]:
        print(f"WARNING: trainable parameters differ: {runs['trl'][-1]['trainable']} vs {runs['loraforge'][-1]['trainable']}")


if __name__ == "__main__":
    main()
