"""The leaner RMSNorm and SiLU-gated product of Llama-style blocks (`loraforge.methods.lora_blocks`): the same
forward, gradients equal in fp32 and within bf16 noise in a real SmolLM2 LoRA step, and less kept for backward."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from loraforge.methods import lora_blocks
from loraforge.methods.lora_blocks import _RMSNorm, _SwiGLU, fuse_decoder_blocks


def hf_rmsnorm(x, weight, eps):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(x.shape[-1], eps=eps)
    with torch.no_grad():
        norm.weight.copy_(weight)
    return norm(x)


def test_rmsnorm_forward_is_hf_s_and_its_gradients_are_autograd_s():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 16, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = (1 + 0.1 * torch.randn(16, generator=g)).requires_grad_()
    ref = hf_rmsnorm(x, weight.detach(), 1e-5)
    out, rstd = _RMSNorm.apply(x, weight, 1e-5, torch.bfloat16)
    assert not rstd.requires_grad
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref.to(torch.bfloat16))  # the very values autocast's casts of HF's output give
    grad = torch.randn(2, 7, 16, generator=g)
    x2, w2 = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    (_RMSNorm.apply(x, weight, 1e-5, torch.float32)[0] * grad).sum().backward()
    xs = x2.float()
    ((w2 * (xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + 1e-5))) * grad).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, w2.grad, rtol=1e-5, atol=1e-5)


def test_swiglu_keeps_two_tensors_and_gives_autograd_s_gradients():
    g = torch.Generator().manual_seed(1)
    gate, up = (torch.randn(5, 12, generator=g).requires_grad_() for _ in range(2))
    gate2, up2 = (t.detach().clone().requires_grad_() for t in (gate, up))
    grad = torch.randn(5, 12, generator=g)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = _SwiGLU.apply(gate, up)
    assert len(saved) == 2
    assert torch.equal(out, F.silu(gate2) * up2)
    (out * grad).sum().backward()
    (F.silu(gate2) * up2 * grad).sum().backward()
    torch.testing.assert_close(gate.grad, gate2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(up.grad, up2.grad, rtol=1e-5, atol=1e-6)


def test_only_llama_style_blocks_are_fused():
    from loraforge.models.tiny import tiny_config
    from transformers import AutoModelForCausalLM

    llama = AutoModelForCausalLM.from_config(tiny_config("llama", 100))
    for p in llama.parameters():
        p.requires_grad_(False)
    assert fuse_decoder_blocks(llama, "llama") == 2
    gemma = AutoModelForCausalLM.from_config(tiny_config("gemma", 100))
    assert fuse_decoder_blocks(gemma, "gemma") == 0  # (1 + weight) norm, GELU-gated MLP: its own code


def saved_bytes(fn, model) -> int:
    """Bytes of distinct storages autograd keeps for backward while `fn` runs forward (weights not counted).

    Inside a fused block its own saved-tensor hooks are the ones autograd calls: what they keep as a tensor
    is recorded too (a save stored as a `_Recompute` keeps only inputs that are saved anyway)."""
    weights = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    storages: dict[int, int] = {}

    def record(t):
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in weights:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    block_pack = lora_blocks._BlockSaves.pack
    with mock.patch.object(lora_blocks._BlockSaves, "pack", lambda self, t: record(block_pack(self, t))), \
            torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
        out = fn()
    return out, sum(storages.values())


@pytest.fixture(scope="module")
def lora_models(smollm2_dir, tmp_path_factory):
    from loraforge.config.loader import config_from_dict
    from loraforge import methods
    from loraforge.train.attention import register_varlen_attention
    from loraforge.train.model import prepare_for_training
    from transformers import AutoModelForCausalLM

    out = {}
    for fused in (False, True):
        cfg = config_from_dict({"base_model": str(smollm2_dir), "method": "lora", "precision": "bf16",
                                "lora_dropout": 0.0, "fused_decoder_blocks": fused, "metadata_path": "unused.jsonl",
                                "output_dir": str(tmp_path_factory.mktemp("blocks") / "out")})
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
        model.config.use_cache = False
        model.set_attn_implementation(register_varlen_attention())
        model = methods.apply_method(model, cfg)
        with torch.no_grad():  # a non-zero B so every adapter gets a gradient
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        prepare_for_training(model, cfg, methods.method_for(cfg))
        out[fused] = model
    return out


def test_a_smollm2_lora_step_has_the_same_loss_within_bf16_noise_gradients_and_keeps_less(lora_models,
                                                                                            smollm2_tokenizer):
    from loraforge.train.loss import CausalLMLoss

    ids = smollm2_tokenizer("The careful doctor answers: rest, fluids, and see a clinic if the fever stays. " * 4,
                            return_tensors="pt")["input_ids"]
    batch = {"input_ids": ids, "labels": ids.clone()}
    results = {}
    for fused, model in lora_models.items():
        model.train()
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            (total, n), kept = saved_bytes(lambda: CausalLMLoss(model, chunked=True)(**batch), model)
        total.backward()
        grads = {k: p.grad.float() for k, p in model.named_parameters() if p.requires_grad}
        results[fused] = (total.item(), kept, grads)
    model = lora_models[False]
    model.zero_grad(set_to_none=True)
    CausalLMLoss(model, chunked=True)(**batch)[0].backward()  # fp32: what bf16 noise is measured against
    exact = {k: p.grad.float() for k, p in model.named_parameters() if p.requires_grad}
    (plain_loss, plain_kept, plain_grads), (loss, kept, grads) = results[False], results[True]
    assert loss == pytest.approx(plain_loss, rel=1e-6)  # the same forward

    def errors(got):
        return torch.tensor([((got[k] - exact[k]).norm() / exact[k].norm()).item() for k in exact])

    fused_err, plain_err = errors(grads), errors(plain_grads)
    # bf16 noise: the fused blocks' gradients are as far from fp32's as plain bf16 autocast's are
    assert fused_err.median() < 1.5 * plain_err.median(), (fused_err.median(), plain_err.median())
    assert fused_err.max() < 1.5 * plain_err.max(), (fused_err.max(), plain_err.max())
    assert kept < 0.85 * plain_kept, (kept, plain_kept)


def test_recomputed_norm_outputs_and_swiglu_product_give_the_very_same_gradients_and_are_not_kept(
        lora_models, smollm2_tokenizer):
    """A block's norm outputs, SiLU-gated product and (packed rows) joined attention output are stored as how to
    recompute them (`_Recompute`): the same loss and bit-for-bit the same gradients as keeping them, with less
    kept for backward."""
    from loraforge.train.loss import CausalLMLoss

    model = lora_models[True]
    ids = smollm2_tokenizer("Drink water, rest, and see a doctor if the pain gets worse. " * 3,
                            return_tensors="pt")["input_ids"]
    # a packed row of two sequences: the varlen attention joins their outputs into o_proj's input
    half = ids.shape[1] // 2
    position_ids = torch.cat([torch.arange(half), torch.arange(ids.shape[1] - half)])[None]
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": position_ids}

    def step():
        model.train()
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            (total, _), kept = saved_bytes(lambda: CausalLMLoss(model, chunked=True)(**batch), model)
        total.backward()
        return total.item(), kept, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    loss, kept, grads = step()
    with mock.patch.object(lora_blocks._BlockSaves, "recompute", lambda self, value, fn, *args: value):
        keep_loss, keep_kept, keep_grads = step()
    assert loss == keep_loss
    assert all(torch.equal(grads[k], keep_grads[k]) for k in grads)
    # SmolLM2 block: 2 × 576 norm outputs and 576 attention outputs (bf16) + 1,536 product values per token
    assert kept < 0.8 * keep_kept, (kept, keep_kept)
    assert not any(b._loraforge_saves.registered for b in model.modules() if hasattr(b, "_loraforge_saves"))
