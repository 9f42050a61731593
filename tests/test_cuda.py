"""Every CUDA path, run for real on a GPU: QLoRA NF4, fp16 with the loss scaler, bf16 autocast, packed varlen
attention, the chunked LM-head loss, the fused LoRA dropout, kill/resume, merge, generate, serve and `estimate`.

Marked `cuda` and skipped without a GPU. `scripts/gpu_check.sh` runs them on the GPU machine; its `--dry-run`
runs the same file on the CPU with LORAFORGE_CUDA_DRY_RUN=1 so the test code itself is exercised before any GPU
time is spent (the few checks that only mean something on CUDA skip there, saying so).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from test_train_helpers import (adapter, assert_losses_close, make_cfg, max_weight_diff, records,  # noqa: F401
                                rows_file, run, start_cli, stop, tiny_llama, train_losses, wait_for, write_config)

HAVE_CUDA = torch.cuda.is_available()
DRY_RUN = os.environ.get("LORAFORGE_CUDA_DRY_RUN") == "1"
DEVICE = "cuda" if HAVE_CUDA else "cpu"

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not HAVE_CUDA and not DRY_RUN,
                                 reason="needs a CUDA GPU (scripts/gpu_check.sh runs these; "
                                        "LORAFORGE_CUDA_DRY_RUN=1 runs them on the CPU as a dry run)")]


def cuda_only(what: str):
    return pytest.mark.skipif(not HAVE_CUDA, reason=f"dry run on the CPU: {what} exists only on CUDA")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_training_really_runs_on_the_gpu(tiny_llama, rows_file, tmp_path):
    """Guards every other test here: the trainer must pick the GPU by itself, without a device key."""
    seen: list[str] = []
    from accelerate import Accelerator

    orig = Accelerator.prepare

    def spy(self, *objs, **kw):
        seen.append(self.device.type)
        return orig(self, *objs, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Accelerator, "prepare", spy)
        run(tiny_llama, rows_file, tmp_path / "r", max_steps=2)
    assert seen and set(seen) == {DEVICE}


# ---- QLoRA ------------------------------------------------------------------------------------------------

def test_qlora_nf4_double_quant_trains_and_merges_to_the_adapter_model(smollm2_dir, tiny_llama, rows_file, tmp_path):
    from loraforge.export import merge_adapter

    # SmolLM2 on the GPU; bitsandbytes' CPU 4-bit kernels take minutes for it, so the dry run uses the tiny model
    model_dir, lr = (smollm2_dir, 1e-3) if HAVE_CUDA else (tiny_llama, 1e-2)
    out = tmp_path / "qlora"
    run(model_dir, rows_file, out, method="qlora", quant_bits=4, bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype="bfloat16", precision="bf16",
        learning_rate=lr, max_steps=12, batch_size=4, cutoff_len=96, target_modules=["q_proj", "v_proj"])
    losses = train_losses(out)
    first, last = losses[min(losses)], losses[max(losses)]
    assert last < (0.8 if HAVE_CUDA else 1.0) * first, losses  # it learns
    if HAVE_CUDA:
        from transformers import AutoModelForCausalLM

        from loraforge.methods import qlora
        from loraforge.config import config_from_dict
        q = AutoModelForCausalLM.from_pretrained(smollm2_dir, **qlora.load_kwargs(config_from_dict(
            {"method": "qlora", "metadata_path": "x.jsonl", "bnb_4bit_use_double_quant": True})))
        layer = q.model.layers[0].self_attn.q_proj
        assert type(layer).__name__ == "Linear4bit" and layer.weight.quant_state.nested  # NF4 + double quant
        del q
    report = merge_adapter(out, tmp_path / "merged", dtype="float32")  # verify=True: merged == base + adapter
    assert report.max_abs_diff <= report.tolerance


# ---- precision ----------------------------------------------------------------------------------------------

def test_bf16_autocast_trains_close_to_fp32_with_fp32_adapter_and_optimizer(tiny_llama, rows_file, tmp_path):
    run(tiny_llama, rows_file, tmp_path / "fp32", precision="fp32", max_steps=4, save_steps=4)
    run(tiny_llama, rows_file, tmp_path / "bf16", precision="bf16", max_steps=4, save_steps=4)
    l32, l16 = train_losses(tmp_path / "fp32"), train_losses(tmp_path / "bf16")
    diffs = [abs(l16[s] - l32[s]) for s in l32]
    assert 0 < max(diffs) < 0.05
    assert {w.dtype for w in adapter(tmp_path / "bf16").values()} == {torch.float32}
    opt = torch.load(tmp_path / "bf16" / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert {s["exp_avg"].dtype for s in opt["state"].values()} == {torch.float32}


@cuda_only("fp16 with a loss scaler")
def test_fp16_with_the_grad_scaler_trains_close_to_fp32(tiny_llama, rows_file, tmp_path):
    run(tiny_llama, rows_file, tmp_path / "fp32", precision="fp32", max_steps=4)
    run(tiny_llama, rows_file, tmp_path / "fp16", precision="fp16", max_steps=4)
    l32, l16 = train_losses(tmp_path / "fp32"), train_losses(tmp_path / "fp16")
    assert max(abs(l16[s] - l32[s]) for s in l32) < 0.05
    assert {w.dtype for w in adapter(tmp_path / "fp16").values()} == {torch.float32}


def _inf_gradient_on_first_step(mp: pytest.MonkeyPatch) -> list[int]:
    """After the first backward, one trainable gradient becomes inf (what an fp16 overflow looks like)."""
    from accelerate import Accelerator

    orig, calls = Accelerator.backward, []

    def backward(self, loss, **kw):
        orig(self, loss, **kw)
        calls.append(1)
        if len(calls) == 1:
            p = next(p for m in self._models for p in m.parameters() if p.requires_grad and p.grad is not None)
            p.grad.fill_(float("inf"))

    mp.setattr(Accelerator, "backward", backward)
    return calls


@cuda_only("fp16's overflow skip")
def test_fp16_overflow_step_is_skipped_not_fatal(tiny_llama, rows_file, tmp_path):
    run(tiny_llama, rows_file, tmp_path / "clean", precision="fp16", max_steps=3)
    with pytest.MonkeyPatch.context() as mp:
        calls = _inf_gradient_on_first_step(mp)
        run(tiny_llama, rows_file, tmp_path / "overflow", precision="fp16", max_steps=3)
    assert calls, "the injection never ran"
    skipped, clean = adapter(tmp_path / "overflow"), adapter(tmp_path / "clean")
    assert all(torch.isfinite(w).all() for w in skipped.values())  # the inf never reached the weights
    assert max_weight_diff(skipped, clean) > 0  # one step fewer was applied


def test_a_non_finite_gradient_without_a_loss_scaler_stops_the_run(tiny_llama, rows_file, tmp_path):
    """The contrast to the fp16 skip: in fp32/bf16 nothing would skip the step, so the run stops, named."""
    from loraforge.train.loop import TrainingDiverged

    with pytest.MonkeyPatch.context() as mp:
        _inf_gradient_on_first_step(mp)
        with pytest.raises(TrainingDiverged) as e:
            run(tiny_llama, rows_file, tmp_path / "diverged", precision="fp32", max_steps=3)
    assert "gradient norm" in str(e.value.format() if hasattr(e.value, "format") else e.value)


# ---- kernels ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_model(smollm2_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                            init_lora_weights=False)).to(DEVICE)


@pytest.fixture(scope="module")
def batches(smollm2_tokenizer):
    from test_perf_packing import QA

    from loraforge.data.batching import collate
    from loraforge.data.templates import encode_conversation

    tok = smollm2_tokenizer
    examples = [encode_conversation(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                    cutoff_len=256)[0] for q, a in QA]
    padded = collate(examples, [[i] for i in range(len(examples))], tok.pad_token_id)
    packed = collate(examples, [list(range(len(examples)))], tok.pad_token_id, pad_to_multiple_of=8)
    move = lambda b: {k: v.to(DEVICE) for k, v in b.items()}  # noqa: E731
    return move(padded), move(packed)


def _loss_and_grads(model, batch, attn: str, *, chunked: bool = True, dtype=None):
    from loraforge.train.loss import CausalLMLoss

    model.get_base_model().set_attn_implementation(attn)
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE, dtype=dtype, enabled=dtype is not None):
        total, n = CausalLMLoss(model, chunked=chunked)(**batch)
    total.backward()
    return total.detach().float(), int(n), {k: p.grad.detach().clone() for k, p in model.named_parameters()
                                            if p.requires_grad}


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_varlen_attention_equals_padded_on_the_device(lora_model, batches, dtype):
    from loraforge.train.attention import register_varlen_attention

    ref_loss, ref_n, ref_grads = _loss_and_grads(lora_model, batches[0], "sdpa", dtype=dtype)
    loss, n, grads = _loss_and_grads(lora_model, batches[1], register_varlen_attention(), dtype=dtype)
    assert n == ref_n > 20
    tol = 1e-4 if dtype is None else 2e-2
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < tol
    worst = max(rel_err(g, ref_grads[k]) for k, g in grads.items())
    assert worst < (1e-3 if dtype is None else 5e-2), worst


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_lm_head_loss_equals_the_plain_loss_on_the_device(lora_model, batches, dtype):
    ref_loss, ref_n, ref_grads = _loss_and_grads(lora_model, batches[0], "sdpa", chunked=False, dtype=dtype)
    loss, n, grads = _loss_and_grads(lora_model, batches[0], "sdpa", chunked=True, dtype=dtype)
    assert n == ref_n
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < (1e-5 if dtype is None else 1e-2)
    assert max(rel_err(g, ref_grads[k]) for k, g in grads.items()) < (1e-4 if dtype is None else 3e-2)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_lora_dropout_equals_dropout_then_linear_on_the_device(dtype):
    import torch.nn.functional as F
    from torch import nn

    from loraforge.methods.lora_dropout import DropoutLinear, keep_mask

    p, g = 0.1, torch.Generator().manual_seed(0)
    x0, w0 = torch.randn(4, 33, 64, generator=g).to(DEVICE), torch.randn(16, 64, generator=g).to(DEVICE)
    lin = nn.Linear(64, 16, bias=False).to(DEVICE)
    lin.weight.data.copy_(w0)
    fused = DropoutLinear.wrap(lin, p).train()
    x = x0.clone().requires_grad_()
    torch.manual_seed(5)
    with torch.autocast(DEVICE, dtype=dtype, enabled=dtype is not None):
        y = fused(x)
    y.float().square().sum().backward()
    xr, wr = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    torch.manual_seed(5)
    keep = keep_mask(xr.shape, p, xr.device).to(xr.dtype)
    with torch.autocast(DEVICE, dtype=dtype, enabled=dtype is not None):
        yr = F.linear(xr * keep / (1 - p), wr)
    yr.float().square().sum().backward()
    tol = 1e-5 if dtype is None else 1e-2
    assert rel_err(y, yr) < tol and rel_err(x.grad, xr.grad) < tol and rel_err(lin.weight.grad, wr.grad) < tol


# ---- kill / resume ------------------------------------------------------------------------------------------

def test_kill_9_then_resume_matches_an_uninterrupted_run_on_the_device(tiny_llama, rows_file, tmp_path):
    steps = 16
    opts = dict(max_steps=steps, save_steps=3, lr_scheduler="linear", warmup_steps=2, lora_dropout=0.2)
    out = tmp_path / "killed"
    config = write_config(make_cfg(tiny_llama, rows_file, out, **opts), tmp_path / "run.yaml")
    proc = start_cli(config, log_dir=tmp_path / "logs")
    try:
        wait_for(lambda: (out / "checkpoint-6" / "trainer_state.json").is_file() and
                 max((r["step"] for r in records(out)), default=0) >= 7, proc, what="checkpoint-6 and step 7")
    finally:
        code = stop(proc, signal.SIGKILL)
    assert code == -signal.SIGKILL, (tmp_path / "logs" / "stderr.txt").read_text()[-2000:]
    assert max(r["step"] for r in records(out)) < steps, "the run finished before it was killed"
    run(tiny_llama, rows_file, out, overwrite_output_dir=False, resume_from_checkpoint="latest", **opts)
    run(tiny_llama, rows_file, tmp_path / "uninterrupted", **opts)
    # cuBLAS picks the same kernels for the same shapes; a small tolerance covers atomics in backward
    assert_losses_close(train_losses(out), train_losses(tmp_path / "uninterrupted"), tol=1e-4)
    assert max_weight_diff(adapter(out), adapter(tmp_path / "uninterrupted")) < 1e-4


# ---- after training: merge, generate, serve -------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(smollm2_dir, tmp_path_factory) -> Path:
    """A SmolLM2 LoRA that answers one question with a made-up fact."""
    from test_train_helpers import write_rows

    data = write_rows(tmp_path_factory.mktemp("d") / "rows.jsonl", n=8, answers=["The code word is ZEBRA-41."])
    out = tmp_path_factory.mktemp("run") / "lora"
    run(smollm2_dir, data, out, learning_rate=2e-3, max_steps=30, batch_size=4, precision="bf16" if HAVE_CUDA
        else "fp32", target_modules="all-linear")
    return out


def test_merge_then_generate_on_the_device_equals_the_adapter_model(smollm2_dir, trained, tmp_path):
    from loraforge.export import merge_adapter
    from loraforge.inference import InferenceModel
    from loraforge.inference.settings import GenerationSettings

    merge_adapter(trained, tmp_path / "merged", dtype="float32")
    q = [{"role": "user", "content": "Question number 3: what should I do?"}]
    greedy = GenerationSettings(max_new_tokens=12)
    with_adapter = InferenceModel.load(smollm2_dir, {"lora": str(trained)}, dtype="float32")
    assert with_adapter.device.type == DEVICE
    a = with_adapter.generate(q, "lora", greedy).text
    del with_adapter
    merged = InferenceModel.load(tmp_path / "merged", dtype="float32")
    assert merged.device.type == DEVICE
    b = merged.generate(q, settings=greedy).text
    assert "ZEBRA" in a and a == b


def test_serve_on_the_device_answers_and_refuses_bad_requests(smollm2_dir, trained):
    import httpx
    from openai import OpenAI

    from loraforge.inference import InferenceModel
    from loraforge.serve.app import create_app
    from loraforge.serve.background import BackgroundServer
    from loraforge.serve.config import ServerConfig

    model = InferenceModel.load(smollm2_dir, {"lora": str(trained)})
    assert model.device.type == DEVICE
    cfg = ServerConfig(base_model=str(smollm2_dir), adapters={"lora": str(trained)}, default_temperature=0.0)
    with BackgroundServer(create_app(cfg, model)) as srv:
        client = OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model="lora", max_tokens=12, messages=[
            {"role": "user", "content": "Question number 3: what should I do?"}])
        assert "ZEBRA" in reply.choices[0].message.content
        bad = httpx.post(srv.url + "/v1/chat/completions", json={"model": "lora", "messages": "nope"}, timeout=60)
        assert 400 <= bad.status_code < 500
        again = client.chat.completions.create(model="lora", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
        assert again.choices[0].message.content is not None  # still serving


# ---- estimate -------------------------------------------------------------------------------------------------

@cuda_only("torch.cuda.max_memory_allocated")
def test_estimate_within_30_percent_of_the_measured_gpu_peak(smollm2_dir, rows_file, tmp_path):
    from loraforge.estimate import CUDA_CONTEXT_BYTES, estimate_memory, format_estimate

    cfg = make_cfg(smollm2_dir, rows_file, tmp_path / "est", precision="bf16", batch_size=4, cutoff_len=256,
                   max_steps=2, target_modules="all-linear")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run(smollm2_dir, rows_file, tmp_path / "est", precision="bf16", batch_size=4, cutoff_len=256, max_steps=2,
        target_modules="all-linear")
    measured = torch.cuda.max_memory_allocated() - base
    est = estimate_memory(cfg, device="cuda")
    print(format_estimate(est))
    # the estimate includes the CUDA context, which max_memory_allocated does not see
    predicted = est.peak_bytes - CUDA_CONTEXT_BYTES
    print(f"measured {measured / 2**20:,.0f} MiB allocated at peak, estimated {predicted / 2**20:,.0f} MiB")
    assert 0.7 * measured <= predicted <= 1.3 * measured
