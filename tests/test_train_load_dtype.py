"""A bf16/fp16 LoRA run loads its frozen base straight in the compute dtype (no fp32 copy of a frozen weight is
ever resident), puts embeddings, norms and trainable parameters back in fp32, and trains as the fp32-loaded run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from test_train_helpers import make_cfg, rows_file, run, tiny_llama, train_losses  # noqa: F401


@pytest.fixture(scope="module")
def tiny_bf16(tiny_llama, tmp_path_factory):
    """The tiny LLaMA stored in bf16, as published checkpoints are."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("bf16") / "tiny-bf16"
    AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(out)
    return out


def _build(cfg, model_dir):
    from loraforge.models.loader import load_tokenizer
    from loraforge.train.model import build_model

    return build_model(cfg, model_dir, load_tokenizer(model_dir), lambda _m: None)[0]


def _loaded_dtype(monkeypatch, cfg, model_dir):
    import loraforge.models.loader as loader

    seen = []
    orig = loader.load_model
    monkeypatch.setattr(loader, "load_model", lambda *a, **k: seen.append(k.get("dtype")) or orig(*a, **k))
    model = _build(cfg, model_dir)
    return seen[0], model


def test_bf16_lora_loads_the_base_in_bf16_and_keeps_what_needs_fp32_in_fp32(monkeypatch, tiny_bf16, rows_file,
                                                                              tmp_path):
    dtype, model = _loaded_dtype(monkeypatch, make_cfg(tiny_bf16, rows_file, tmp_path, precision="bf16",
                                                       torch_dtype="auto"), tiny_bf16)
    assert dtype == "bfloat16"
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32, name  # adapter weights and their optimizer state
        elif "norm" in name:
            assert p.dtype == torch.float32, name  # norm weights
        else:
            assert p.dtype == torch.bfloat16, name  # frozen linears and embedding tables: never fp32
    embed = model.get_input_embeddings()
    assert embed(torch.tensor([[1, 2]])).dtype == torch.float32  # ... whose lookups start an fp32 residual stream
    assert all(b.dtype == torch.float32 for n, b in model.named_buffers() if "inv_freq" in n)


@pytest.mark.parametrize("overrides", [dict(precision="fp32"), dict(precision="bf16", torch_dtype="float32"),
                                       dict(precision="bf16", use_dora=True)])
def test_fp32_runs_an_explicit_dtype_and_dora_load_as_before(monkeypatch, tiny_bf16, rows_file, tmp_path, overrides):
    dtype, _ = _loaded_dtype(monkeypatch, make_cfg(tiny_bf16, rows_file, tmp_path, **overrides), tiny_bf16)
    assert dtype == overrides.get("torch_dtype", "auto")


def test_an_fp32_checkpoint_is_mapped_in_fp32_then_cast(monkeypatch, tiny_llama, rows_file, tmp_path):
    """fp32 on disk (the embedded SmolLM2): converting while loading would cost more peak memory than mapping."""
    dtype, model = _loaded_dtype(monkeypatch, make_cfg(tiny_llama, rows_file, tmp_path, precision="bf16"), tiny_llama)
    assert dtype == "auto"
    frozen = {p.dtype for n, p in model.named_parameters() if not p.requires_grad and "proj" in n}
    assert frozen == {torch.bfloat16}  # cast_frozen still stores the frozen linears in bf16


def test_bf16_loaded_run_trains_as_the_fp32_loaded_run(tiny_bf16, rows_file, tmp_path):
    run(tiny_bf16, rows_file, tmp_path / "direct", precision="bf16", max_steps=4)
    run(tiny_bf16, rows_file, tmp_path / "fp32load", precision="bf16", torch_dtype="float32", max_steps=4)
    a, b = train_losses(tmp_path / "direct"), train_losses(tmp_path / "fp32load")
    assert a.keys() == b.keys()
    assert max(abs(a[s] - b[s]) for s in a) < 2e-2  # bf16 noise: the same weights, rounded once either way


def test_peak_memory_of_building_a_bf16_smollm2_drops_by_the_fp32_copy(smollm2_dir, tmp_path):
    """In a fresh process each: build the bf16 LoRA model of SmolLM2 stored in bf16, loaded directly vs widened to
    fp32 then cast back (what `torch_dtype: auto` did on a CPU before)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bf16_dir = tmp_path / "smollm2-bf16"
    AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16).save_pretrained(bf16_dir)
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(bf16_dir)
    smollm2_dir = bf16_dir
    child = textwrap.dedent("""
        import json, sys
        from loraforge.config import config_from_dict
        from loraforge.estimate import peak_rss_bytes
        from loraforge.models.loader import load_tokenizer
        from loraforge.train.model import build_model
        cfg = config_from_dict(json.loads(sys.argv[1]))
        build_model(cfg, sys.argv[2], load_tokenizer(sys.argv[2]), lambda m: None)
        print("MAXRSS", peak_rss_bytes())
    """)
    peaks = {}
    for dtype in ("auto", "float32"):
        raw = {"base_model": str(smollm2_dir), "metadata_path": "x.jsonl", "precision": "bf16", "torch_dtype": dtype,
               "target_modules": "all-linear"}
        out = subprocess.run([sys.executable, "-c", child, json.dumps(raw), str(smollm2_dir)], capture_output=True,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        peaks[dtype] = int(out.stdout.split("MAXRSS")[-1].split()[0])
    saved = (peaks["float32"] - peaks["auto"]) / 2**20
    print(f"peak RSS building SmolLM2 LoRA bf16: direct {peaks['auto'] / 2**20:.0f} MiB, "
          f"fp32 then cast {peaks['float32'] / 2**20:.0f} MiB ({saved:.0f} MiB less)")
    # 135 M parameters: the widened fp32 copy alone is ~515 MiB
    assert saved > 200
