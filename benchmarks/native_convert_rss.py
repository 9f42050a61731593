"""Peak memory of converting a full-width ChatGLM3-6B-shaped checkpoint (`loraforge convert`), vs. its size.

Writes a synthetic checkpoint in the hub layout of ChatGLM3-6B — its real config (hidden 4096, FFN 13696, 32 heads,
2 multi-query groups, 65024-token vocabulary, fp16) with fewer layers so it is a few GB — as sharded pickled
`pytorch_model-0000k-of-0000n.bin` files plus the index, like the hub's (and again as safetensors shards). The tokenizer files come from the tiny
seedmodels fixture (the tokenizer does not change the weights' memory). Then, in a fresh process per run (so the
peak RSS is that conversion's alone: VmHWM), `models.native.convert` with the given output shard size; the
process's RSS after importing torch/transformers is the baseline, and anonymous memory vs. mapped file pages are
sampled every 20 ms (a memory-mapped shard's pages count in RSS but are clean page cache the kernel can drop). Everything written is deleted at the end.

    OMP_NUM_THREADS=2 python benchmarks/native_convert_rss.py --layers 5 --source-shard-gb 1 --out-shard-gb 2 0.5 --source-format bin safetensors
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "seedmodels" / "chatglm3" / "chatglm3_a"
CHATGLM3_6B = {  # THUDM/chatglm3-6b config.json, weights-relevant keys
    "_name_or_path": "THUDM/chatglm3-6b", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
    "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
    "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0, "attention_softmax_in_fp32": True,
    "bias_dropout_fusion": True, "ffn_hidden_size": 13696, "fp32_residual_connection": False, "hidden_dropout": 0.0,
    "hidden_size": 4096, "kv_channels": 128, "layernorm_epsilon": 1e-05, "multi_query_attention": True,
    "multi_query_group_num": 2, "num_attention_heads": 32, "num_layers": 28, "original_rope": True,
    "padded_vocab_size": 65024, "post_layer_norm": True, "rmsnorm": True, "seq_length": 8192, "use_cache": True,
    "torch_dtype": "float16", "tie_word_embeddings": False, "eos_token_id": 2, "pad_token_id": 0,
}


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, f, v = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["padded_vocab_size"]
    qkv = h + 2 * cfg["multi_query_group_num"] * cfg["kv_channels"]
    out = [("transformer.embedding.word_embeddings.weight", (v, h))]
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}"
        out += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.self_attention.query_key_value.weight", (qkv, h)),
                (f"{p}.self_attention.query_key_value.bias", (qkv,)), (f"{p}.self_attention.dense.weight", (h, h)),
                (f"{p}.post_attention_layernorm.weight", (h,)), (f"{p}.mlp.dense_h_to_4h.weight", (2 * f, h)),
                (f"{p}.mlp.dense_4h_to_h.weight", (h, f))]
    return out + [("transformer.encoder.final_layernorm.weight", (h,)), ("transformer.output_layer.weight", (v, h))]


def write_checkpoint(src: Path, layers: int, shard_bytes: int, fmt: str = "bin") -> dict:
    """The synthetic checkpoint, one shard in memory at a time (this process is not the one measured)."""
    import torch

    cfg = dict(CHATGLM3_6B, num_layers=layers)
    src.mkdir(parents=True)
    (src / "config.json").write_text(json.dumps(cfg, indent=1))
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy2(FIXTURE / name, src / name)
    gen = torch.Generator().manual_seed(0)
    shards: list[dict] = [{}]
    size = 0
    for name, shape in tensor_shapes(cfg):
        n = 1
        for d in shape:
            n *= d
        if shards[-1] and size + 2 * n > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = shape
        size += 2 * n
    weight_map, sizes = {}, []
    for k, names in enumerate(shards, 1):
        state = {n: (torch.randn(s, generator=gen) * 0.02).to(torch.float16) for n, s in names.items()}
        if fmt == "bin":
            file = f"pytorch_model-{k:05d}-of-{len(shards):05d}.bin"
            torch.save(state, src / file)
        else:
            from safetensors.torch import save_file

            file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            save_file(state, str(src / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in state})
        sizes.append((src / file).stat().st_size)
        del state
    (src / ("pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json")).write_text(json.dumps({"metadata": {"total_size": sum(sizes)},
                                                                  "weight_map": weight_map}))
    return {"source_files": len(sizes), "source_total_bytes": sum(sizes), "largest_source_shard_bytes": max(sizes)}


def _status() -> dict[str, int]:
    """Memory lines of /proc/self/status, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def child(src: str, out: str, out_shard_bytes: int) -> None:
    """Runs in its own process: the conversion, with its peak RSS (ru_maxrss) and the baseline before it."""
    import torch  # noqa: F401  (the baseline includes the libraries the conversion needs)
    import transformers  # noqa: F401

    from loraforge.models.native import convert

    baseline = _status()["VmRSS"]
    peaks = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample() -> None:  # anonymous memory vs mapped file pages, every 20 ms
        while not done.wait(0.02):
            now = _status()
            for k in peaks:
                peaks[k] = max(peaks[k], now[k])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    convert(src, out, max_shard_bytes=out_shard_bytes)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    # VmHWM, not getrusage's ru_maxrss: Linux carries the forking parent's high-water mark across exec into
    # ru_maxrss (every run would report the checkpoint writer's peak).
    peak = _status()["VmHWM"]
    files = sorted(Path(out).glob("*.safetensors"))
    print(json.dumps({"seconds": round(seconds, 1), "baseline_rss_bytes": baseline, "peak_rss_bytes": peak,
                      "peak_anon_bytes": peaks["RssAnon"], "peak_file_bytes": peaks["RssFile"],
                      "out_files": len(files), "largest_out_shard_bytes": max(f.stat().st_size for f in files),
                      "out_total_bytes": sum(f.stat().st_size for f in files)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=5, help="ChatGLM3-6B has 28; 5 gives a 3.1 GB checkpoint")
    ap.add_argument("--source-shard-gb", type=float, default=1.0)
    ap.add_argument("--out-shard-gb", type=float, nargs="+", default=[2.0, 0.5],
                    help="output shard sizes to measure (convert's default is 2)")
    ap.add_argument("--source-format", nargs="+", default=["bin", "safetensors"], choices=["bin", "safetensors"],
                    help="the checkpoint's weight files: pickled .bin (ChatGLM3's hub layout) and/or safetensors")
    ap.add_argument("--workdir", type=Path, default=None, help="where the synthetic files go (default: a temp dir)")
    args = ap.parse_args()
    gb = 1024**3
    root = Path(tempfile.mkdtemp(prefix="native-rss-", dir=args.workdir))
    print("| source | output shard GB | convert s | source total GB | largest source shard GB | largest output shard GB "
          "| baseline RSS GB | peak RSS GB | peak anon / mapped-file GB | peak − baseline GB | (peak − baseline) / total |")
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    try:
        for fmt in args.source_format:
            start = time.perf_counter()
            src = root / f"src-{fmt}"
            info = write_checkpoint(src, args.layers, int(args.source_shard_gb * gb), fmt)
            print(f"(wrote {info['source_files']} {fmt} shards, {info['source_total_bytes'] / gb:.2f} GB, in "
                  f"{time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
            for out_gb in args.out_shard_gb:
                out = root / f"out-{out_gb}"
                run = subprocess.run([sys.executable, __file__, "--child", str(src), str(out), str(int(out_gb * gb))],
                                     check=True, capture_output=True, text=True)
                r = json.loads(run.stdout.strip().splitlines()[-1])
                used = r["peak_rss_bytes"] - r["baseline_rss_bytes"]
                print(f"| {fmt} | {out_gb} | {r['seconds']} | {info['source_total_bytes'] / gb:.2f} | "
                      f"{info['largest_source_shard_bytes'] / gb:.2f} | {r['largest_out_shard_bytes'] / gb:.2f} | "
                      f"{r['baseline_rss_bytes'] / gb:.2f} | {r['peak_rss_bytes'] / gb:.2f} | "
                      f"{r['peak_anon_bytes'] / gb:.2f} / {r['peak_file_bytes'] / gb:.2f} | {used / gb:.2f} | "
                      f"{used / info['source_total_bytes']:.2f} |", flush=True)
                shutil.rmtree(out)
            shutil.rmtree(src)
    finally:
        shutil.rmtree(root, ignore_errors=True)

if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
