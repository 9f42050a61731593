"""GPU: loraforge vs HF Trainer + PEFT on a 1.4 B-parameter model, bf16, cutoff 1024 — tokens/s, peak GPU memory
and model FLOPs utilisation (MFU) against this GPU's bf16 matmul rate measured at the model's own shapes.

The model has Qwen2.5-1.5B's shape (hidden 1536, 28 layers, 12 heads / 2 KV heads, MLP 8960) with SmolLM2's
tokenizer and vocabulary (49,152), random weights: speed does not need trained weights, and no download is needed.
Both engines are benchmarks/train_throughput.py's (same examples in the same order, same LoRA on every linear layer,
same steps), each run in its own process, alternating.

FLOPs per trained token (the usual accounting, LoRA's own small matrices left out): the frozen linears need the
forward product and the input-gradient product, 2·N + 2·N = 4·N for N linear weights (blocks + LM head); attention
adds 4·L·d·c forward (QKᵀ and PV over a mean causal context c = mean sequence length / 2) and twice that backward.

    python benchmarks/gpu_throughput.py --steps 12 --repeats 1        # on the GPU (scripts/gpu_check.sh runs this)
    python benchmarks/gpu_throughput.py --dry-run                     # the same code on the CPU, a tiny model
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput  # noqa: E402  (the two engines and their side-by-side runner)

SHAPE = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
             num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1e6, tie_word_embeddings=True)
DRY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)


def build_model(out: Path, shape: dict, device: str) -> int:
    """A random Qwen2 of `shape` with SmolLM2's tokenizer, saved in bf16; returns its parameter count."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from loraforge.models.gguf import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2"))
    cfg = Qwen2Config(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, dtype="bfloat16", **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def matmul_peak_tflops(shape: dict, tokens: int, device: str, dtype_name: str) -> float:
    """The best bf16 rate of this device over the model's own matmul shapes ([tokens × in] @ [in × out])."""
    import torch

    dtype = getattr(torch, dtype_name)
    h, m = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    best = 0.0
    for k, n in [(h, h), (h, kv), (h, m), (m, h)]:
        a = torch.randn(tokens, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        reps = 20 if device == "cuda" else 3
        for _ in range(3):
            a @ b
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = max(best, 2 * tokens * k * n * reps / (time.perf_counter() - t) / 1e12)
    return best


def flops_per_token(shape: dict, vocab: int, mean_seq: float) -> float:
    h, m, L = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    linear = L * (h * h * 2 + 2 * h * kv + 3 * h * m) + vocab * h  # q, o, k, v, gate/up/down, LM head
    attention = 4 * L * h * (mean_seq / 2)
    return 4 * linear + 3 * attention


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--cutoff", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--data", type=Path, default=train_throughput.DEFAULT_DATA)
    p.add_argument("--json", type=Path, help="also write the summary here")
    p.add_argument("--dry-run", action="store_true", help="tiny model, CPU, 3 steps: checks the code, not the GPU")
    args = p.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    shape = DRY_SHAPE if args.dry_run else SHAPE
    steps, cutoff, batch = (3, 128, 2) if args.dry_run else (args.steps, args.cutoff, args.batch_size)
    if device == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    with tempfile.TemporaryDirectory(prefix="lf-gpu-bench-") as tmp:
        model_dir = Path(tmp) / "model"
        n_params = build_model(model_dir, shape, device)
        peak = matmul_peak_tflops(shape, batch * cutoff, device, "bfloat16" if device == "cuda" else "float32")
        print(f"model: Qwen2.5-1.5B shape{' (dry run: tiny)' if args.dry_run else ''}, {n_params / 1e9:.3f} B "
              f"parameters; measured matmul peak at its shapes {peak:.1f} TFLOP/s", flush=True)
        out_json = Path(tmp) / "rows.json"
        train_throughput.main(["--cases", "alpaca", "--profile-steps", "0",
                               "--base-model", str(model_dir), "--data", str(args.data), "--steps", str(steps),
                               "--batch-size", str(batch), "--cutoff", str(cutoff), "--repeats", str(args.repeats),
                               "--precision", "bf16" if device == "cuda" else "fp32", "--json", str(out_json)])
        rows = json.loads(out_json.read_text())["rows"]
    vocab = 49152
    print(f"\n{'run':40} {'tok/s':>9} {'×':>6} {'peak GPU MiB':>12} {'×':>6} {'MFU':>6}")
    base = rows[0]
    for row in rows:
        mfu = row["tokens_per_s"] * flops_per_token(shape, vocab, row["mean_seq_tokens"]) / (peak * 1e12)
        row["mfu"] = mfu
        gpu = row.get("peak_gpu_mb")
        gx = gpu / base["peak_gpu_mb"] if gpu and base.get("peak_gpu_mb") else float("nan")
        print(f"{row['name'][:40]:40} {row['tokens_per_s']:9.1f} {row['tokens_per_s'] / base['tokens_per_s']:6.2f} "
              f"{gpu or float('nan'):12.0f} {gx:6.2f} {mfu:6.1%}")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "peak_tflops": peak, "params": n_params, "rows": rows},
                                        indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
