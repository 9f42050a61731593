"""`estimate_memory`: parameter counts equal the built model's; peak memory within ±30% of a real SmolLM2 run."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap

import pytest

from loraforge.config import config_from_dict
from loraforge.estimate import estimate_memory, format_estimate

MiB = 2**20


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from loraforge.models.tiny import tiny_model_dir

    return tiny_model_dir("llama", tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """32 alpaca rows of 70–300 tokens (a third longer than cutoff 256), written by the test."""
    rng = random.Random(0)
    words = ("the patient should drink water rest take medicine see a doctor if fever lasts more than three "
             "days").split()
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with path.open("w") as f:
        for i in range(32):
            q = " ".join(rng.choice(words) for _ in range(rng.randint(10, 40)))
            a = " ".join(rng.choice(words) for _ in range(rng.randint(60, 260)))
            f.write(json.dumps({"instruction": f"Question {i}: {q}?", "output": a}) + "\n")
    return path


def built_counts(cfg):
    """(trainable, total) from requires_grad on the really built model (tiny: the weights are small)."""
    from loraforge.methods import apply_method
    from loraforge.methods.report import trainable_report
    from loraforge.models.loader import load_model

    model = load_model(cfg.base_model, cfg.task_type)
    report = trainable_report(apply_method(model, cfg))
    return report.trainable, report.total


@pytest.mark.parametrize("extra", [
    {"method": "lora", "target_modules": ["q_proj", "v_proj"]},
    {"method": "lora", "target_modules": "all-linear", "lora_rank": 4},
    {"method": "lora", "target_modules": ["q_proj", "v_proj"], "use_dora": True},
    {"method": "lora", "target_modules": ["q_proj"], "layers_to_transform": [1]},
    {"method": "lora", "lora_bias": "all"},
    {"method": "full"},
    {"method": "freeze", "freeze_trainable_layers": 1},
    {"method": "prompt", "num_virtual_tokens": 10},
])
def test_parameter_counts_match_the_built_model(tiny_llama, data_file, extra):
    cfg = config_from_dict({"base_model": str(tiny_llama), "metadata_path": str(data_file), **extra})
    est = estimate_memory(cfg, baseline_bytes=0, device="cpu")
    assert (est.trainable_params, est.total_params) == built_counts(cfg)


def test_memory_terms_follow_the_config(tiny_llama, data_file):
    base = {"base_model": "smollm2", "metadata_path": str(data_file), "batch_size": 4, "cutoff_len": 256}

    def est(**kw):
        return estimate_memory(config_from_dict({**base, **kw}), baseline_bytes=400 * MiB, device="cpu")

    plain = est(precision="fp32")
    assert plain.total_params == 134_515_008 + plain.trainable_params  # SmolLM2, tied embeddings counted once
    assert plain.weights_bytes == 134_515_008 * 4  # fp32
    # chunked: at most LOSS_CHUNK_TOKENS labelled positions' logits at once; unchunked: all of them
    assert est(batch_size=16, chunked_loss=False, precision="fp32").loss_bytes >= 3.5 * est(batch_size=16, precision="fp32").loss_bytes
    assert est(gradient_checkpointing=True, precision="fp32").activation_bytes < plain.activation_bytes / 5
    # bf16: LoRA stores the frozen linears in bf16 (no autocast copies); DoRA keeps them fp32, copied per use
    bf16 = est(precision="bf16")
    assert bf16.weight_cast_bytes == 0 and bf16.weights_bytes < 0.7 * plain.weights_bytes
    assert est(precision="bf16", use_dora=True).weight_cast_bytes > 100 * MiB
    assert est(precision="bf16", method="qlora").weight_cast_bytes > 0  # QLoRA's linears are not cast to bf16
    assert est(method="qlora", precision="fp32").weights_bytes < plain.weights_bytes / 2.5
    assert est(batch_size=8, precision="fp32").activation_bytes == pytest.approx(2 * plain.activation_bytes, rel=0.01)
    text = format_estimate(plain)
    # r=8 on every linear layer of the 30 blocks: q, k, v, o (3,840 in + out) and gate, up, down (6,336)
    assert "trainable params: 2,442,240" in text and "total" in text and "data p90" in text


def test_estimate_uses_the_loss_chunk_size_training_uses():
    from loraforge.estimate import LOSS_CHUNK_TOKENS
    from loraforge.train.loss import DEFAULT_CHUNK_TOKENS

    assert LOSS_CHUNK_TOKENS == DEFAULT_CHUNK_TOKENS


@pytest.mark.slow
def test_estimate_within_30_percent_of_a_real_run(smollm2_dir, data_file, tmp_path):
    """A real 2-step LoRA run of SmolLM2 (batch 4, cutoff 256) in a fresh process; its peak RSS vs the estimate."""
    raw = {"base_model": "smollm2", "metadata_path": str(data_file), "batch_size": 4, "cutoff_len": 256,
           "max_steps": 2, "output_dir": str(tmp_path / "run"), "save_steps": None, "report_to": ["none"],
           "plot_loss": False, "tokenized_cache": False}
    child = textwrap.dedent("""
        import json, sys
        from loraforge.config import config_from_dict
        from loraforge.estimate import peak_rss_bytes
        from loraforge.train.loop import train
        train(config_from_dict(json.loads(sys.argv[1])), echo=lambda m: None)
        print("MAXRSS", peak_rss_bytes())
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-c", child, json.dumps(raw)], capture_output=True, text=True, env=env,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    measured = int(out.stdout.split("MAXRSS")[-1].split()[0])
    est = estimate_memory(config_from_dict(raw), device="cpu")
    print(format_estimate(est))
    print(f"measured peak RSS {measured / MiB:,.0f} MiB, estimated {est.peak_bytes / MiB:,.0f} MiB "
          f"({100 * (est.peak_bytes / measured - 1):+.1f}%)")
    assert 0.7 * measured <= est.peak_bytes <= 1.3 * measured


def test_fsdp2_divides_weights_and_trainable_state_by_the_process_count(tiny_llama, data_file):
    """Per process under FSDP2: 1/N of the weights and AdamW state, plus the weights gathered at a time (root:
    embeddings + final norm + head; two decoder layers); DDP keeps everything plus its gradient buckets.
    Measured against real 2-process runs in benchmarks/fsdp_memory.py (BENCHMARKS.md)."""
    cfg = config_from_dict({"base_model": str(tiny_llama), "metadata_path": str(data_file), "method": "full",
                            "output_dir": "/tmp/unused"})
    one = estimate_memory(cfg, baseline_bytes=0, device="cpu")
    ddp = estimate_memory(cfg, baseline_bytes=0, device="cpu", processes=2)
    fsdp = estimate_memory(cfg, baseline_bytes=0, device="cpu", processes=2, sharding="fsdp2")
    assert ddp.weights_bytes == one.weights_bytes
    grads = one.trainable_params * 4  # fp32: DDP's buckets hold a second copy of the gradients
    assert ddp.trainable_state_bytes == one.trainable_state_bytes + grads
    assert fsdp.trainable_state_bytes == one.trainable_state_bytes // 2
    # the tiny LLaMA has 2 layers: root + the 2 layers gathered at a time are the whole model, so its weights
    # do not shrink at the peak (only its trainable state does)
    assert fsdp.weights_bytes == one.weights_bytes
    assert fsdp.activation_bytes == one.activation_bytes  # activations are per process
    assert "processes: 2 (fsdp2)" in format_estimate(fsdp) and "FSDP2 over 2 processes" in format_estimate(fsdp)
