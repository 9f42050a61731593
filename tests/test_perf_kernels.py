"""The speed/memory kernels compute what the plain path computes: LoRA dropout as a mask (methods/lora_dropout.py),
the fused LM-head cross-entropy under autocast (train/loss.py), fp32 varlen attention under bf16 autocast
(train/attention.py), frozen LoRA base weights stored in the autocast dtype and LoRA inputs left in theirs
(train/setup.py)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loraforge.methods.lora_dropout import DropoutLinear, fuse_lora_dropout, keep_mask


def tiny_model(family: str, **overrides):
    """A tiny random causal LM (hidden 32, 2 layers), seeded."""
    from transformers import AutoModelForCausalLM

    from loraforge.models.tiny import tiny_config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(family, 100, **overrides))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _dropout_reference(x, weight, p, seed):
    """PEFT's composition lora_A(dropout(x)) with the mask DropoutLinear draws for `seed`."""
    torch.manual_seed(seed)
    keep = keep_mask(x.shape, p, x.device).to(x.dtype)
    return F.linear(x * keep / (1 - p), weight)


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_dropout_linear_equals_dropout_then_linear(p):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 17, 24, generator=g)
    w0 = torch.randn(4, 24, generator=g)
    lin = nn.Linear(24, 4, bias=False)
    lin.weight.data.copy_(w0)
    fused = DropoutLinear.wrap(lin, p).train()
    assert fused.weight is lin.weight  # one Parameter: the optimizer and the saved adapter see the same tensor

    x = x0.clone().requires_grad_()
    torch.manual_seed(7)
    y = fused(x)
    (y * torch.arange(4.0)).sum().backward()

    xr, wr = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    yr = _dropout_reference(xr, wr, p, seed=7)
    (yr * torch.arange(4.0)).sum().backward()
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lin.weight.grad, wr.grad, rtol=1e-5, atol=1e-5)
    assert x.grad.eq(0).float().mean().item() == pytest.approx(p, abs=0.1)  # dropped inputs get no gradient


def test_dropout_linear_under_bf16_autocast_matches_the_autocast_composition():
    g = torch.Generator().manual_seed(1)
    x0, w0 = torch.randn(64, 32, generator=g), torch.randn(8, 32, generator=g)
    lin = nn.Linear(32, 8, bias=False)
    lin.weight.data.copy_(w0)
    fused = DropoutLinear.wrap(lin, 0.1).train()
    x = x0.clone().requires_grad_()
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    xr, wr = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yr = _dropout_reference(xr, wr, 0.1, seed=3)
    yr.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and lin.weight.grad.dtype == torch.float32
    # bf16 rounds at other points (the 1/(1-p) scale is applied after the matmul): equal to bf16 precision
    assert rel_err(y.float(), yr.float()) < 1e-2
    assert rel_err(x.grad, xr.grad) < 1e-2 and rel_err(lin.weight.grad, wr.grad) < 1e-2


def test_keep_mask_rate_independence_and_seed():
    torch.manual_seed(0)
    a = keep_mask(torch.Size([1000, 1000]), 0.05, torch.device("cpu"))
    b = keep_mask(torch.Size([1000, 1000]), 0.05, torch.device("cpu"))
    assert a.dtype == torch.uint8
    assert a.float().mean().item() == pytest.approx(0.95, abs=1e-3)
    both = (a.bool() & b.bool()).float().mean().item()
    assert both == pytest.approx(0.95 ** 2, abs=1e-3)  # independent draws, not one mask reused
    torch.manual_seed(0)
    assert torch.equal(keep_mask(torch.Size([1000, 1000]), 0.05, torch.device("cpu")), a)  # reproducible


def test_fuse_lora_dropout_keeps_keys_eval_outputs_and_plain_peft_loading(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                           target_modules="all-linear", init_lora_weights=False))
    keys = set(model.state_dict())
    ids = torch.randint(0, 100, (2, 9))
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    assert fuse_lora_dropout(model) == 7 * model.config.num_hidden_layers
    assert fuse_lora_dropout(model) == 0  # idempotent
    assert set(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)  # eval: no dropout either way
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, before)  # train: dropout is on
    model.save_pretrained(tmp_path)
    fresh = PeftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, before)


def test_fuse_lora_dropout_leaves_p0_and_dora_to_peft():
    from peft import LoraConfig, get_peft_model

    assert fuse_lora_dropout(get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_dropout=0.0,
                                                                           target_modules=["q_proj"]))) == 0
    assert fuse_lora_dropout(get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_dropout=0.1, use_dora=True,
                                                                           target_modules=["q_proj"]))) == 0


@pytest.mark.parametrize("trainable_head", [False, True])
def test_fused_head_loss_under_bf16_autocast_matches_checkpointed_chunks(trainable_head):
    from loraforge.train.loss import _head_ce, chunked_lm_loss

    g = torch.Generator().manual_seed(0)
    hidden0 = torch.randn(2, 40, 32, generator=g)
    labels = torch.randint(0, 300, (2, 40), generator=g)
    labels[0, :10] = -100
    head = nn.Linear(32, 300, bias=False)
    head.weight.data.copy_(torch.randn(300, 32, generator=g) * 0.2)
    head.weight.requires_grad_(trainable_head)

    hidden = hidden0.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, n = chunked_lm_loss(hidden, head, labels, chunk_tokens=16)
    fused.backward()
    g_fused = (hidden.grad.clone(), head.weight.grad.clone() if trainable_head else None)
    head.weight.grad = None

    # the reference: plain autocast head + fp32 cross-entropy over the same positions
    ref_hidden = hidden0.clone().requires_grad_()
    h = ref_hidden[:, :-1].reshape(-1, 32)
    t = labels[:, 1:].reshape(-1)
    keep = t != -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _head_ce(head, h[keep], t[keep])
    ref.backward()
    assert n.item() == keep.sum().item()
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-3)
    # the weight gradient sums chunks in fp32 where the reference takes one bf16 matmul: bf16-close
    assert rel_err(g_fused[0], ref_hidden.grad) < 1e-2
    if trainable_head:
        assert rel_err(g_fused[1], head.weight.grad) < 1e-2


@pytest.mark.parametrize("bias", [False, True])
def test_frozen_head_logps_equal_autograd_s_values_and_input_gradients(bias):
    """The preference losses' per-position log-probs through a frozen head (`_FrozenHeadLogp`, its input gradient
    formed in forward): the same values and the same input gradient as autograd's, under per-position incoming
    gradients (a DPO loss weights each sequence's tokens differently), across chunk boundaries; no grad → none."""
    from loraforge.train.loss import _FrozenHeadLogp, chunked_token_logps

    g = torch.Generator().manual_seed(3)
    hidden0 = torch.randn(2, 30, 16, generator=g, dtype=torch.float64).float()
    labels = torch.randint(0, 90, (2, 30), generator=g)
    labels[1, :7] = -100
    head = nn.Linear(16, 90, bias=bias).requires_grad_(False)
    hidden = hidden0.clone().requires_grad_()
    calls = []
    original = _FrozenHeadLogp.apply
    with mock.patch.object(_FrozenHeadLogp, "apply", side_effect=lambda *a: calls.append(1) or original(*a)):
        lp, keep = chunked_token_logps(hidden, head, labels, chunk_tokens=8)
    assert calls, "a frozen nn.Linear head takes the fused path"
    upstream = torch.randn(lp.shape[0], generator=g)
    (lp * upstream).sum().backward()

    ref_hidden = hidden0.clone().requires_grad_()
    h = ref_hidden[:, :-1].reshape(-1, 16)[keep]
    t = labels[:, 1:].reshape(-1)[keep]
    ref = torch.log_softmax(head(h).float(), dim=-1).gather(1, t[:, None]).squeeze(1)
    (ref * upstream).sum().backward()
    assert lp.shape == ref.shape == (int(keep.sum()),)
    torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        lp2, _ = chunked_token_logps(hidden0, head, labels, chunk_tokens=8)
    assert not lp2.requires_grad
    torch.testing.assert_close(lp2, ref.detach(), rtol=1e-5, atol=1e-5)


def test_head_loss_without_grad_computes_no_gradients():
    from loraforge.train.loss import chunked_lm_loss, lm_loss_sum

    hidden, head = torch.randn(1, 12, 8), nn.Linear(8, 20, bias=False)
    labels = torch.randint(0, 20, (1, 12))
    with torch.no_grad():
        loss, _ = chunked_lm_loss(hidden, head, labels, chunk_tokens=5)
        plain, _ = lm_loss_sum(head(hidden), labels)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-5)


def test_varlen_attention_under_bf16_autocast_matches_each_example_alone():
    from loraforge.train.attention import varlen_attention_forward

    g = torch.Generator().manual_seed(0)
    lengths = [5, 11, 7]
    q = torch.randn(1, 6, sum(lengths), 16, generator=g).to(torch.bfloat16)
    k = torch.randn(1, 2, sum(lengths), 16, generator=g).to(torch.bfloat16)  # grouped-query: 3 query heads per kv
    v = torch.randn(1, 2, sum(lengths), 16, generator=g).to(torch.bfloat16)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    out, _ = varlen_attention_forward(nn.Module(), q, k, v, None, scaling=0.25, position_ids=pos)
    assert out.dtype == torch.bfloat16 and out.shape == (1, sum(lengths), 6, 16)
    start = 0
    for n in lengths:
        s = slice(start, start + n)
        ref = F.scaled_dot_product_attention(q[:, :, s].float(), k[:, :, s].float().repeat_interleave(3, 1),
                                             v[:, :, s].float().repeat_interleave(3, 1), is_causal=True, scale=0.25)
        torch.testing.assert_close(out[0, s].float(), ref.transpose(1, 2)[0], rtol=1e-2, atol=1e-2)
        start += n


def test_frozen_linears_are_stored_in_the_compute_dtype_except_tied_heads():
    from peft import LoraConfig, get_peft_model

    from loraforge.methods.lora_training import cast_frozen_linears

    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama", tie_word_embeddings=True), LoraConfig(r=4, target_modules=["q_proj"],
                                                                                     init_lora_weights=False))
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(input_ids=ids).logits
    n = cast_frozen_linears(model, torch.bfloat16)
    base = model.get_base_model()
    assert n > 0 and base.lm_head.weight.dtype == torch.float32  # tied: left to cast_frozen_embeddings
    assert base.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # adapters stay fp32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)  # the very same matmuls


def test_frozen_tied_embedding_is_stored_16_bit_and_still_starts_an_fp32_residual_stream():
    """The tied head no longer casts 28 M fp32 values per forward: the table is bf16, its lookups widened to fp32,
    and the logits are those of the fp32 table rounded to bf16 (what the autocast head multiplied by)."""
    from peft import LoraConfig, get_peft_model

    from loraforge.methods.lora_training import cast_frozen_embeddings, cast_frozen_linears

    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama", tie_word_embeddings=True), LoraConfig(r=4, target_modules=["q_proj"],
                                                                                     init_lora_weights=False))
    base = model.get_base_model()
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        base.model.embed_tokens.weight.copy_(base.model.embed_tokens.weight.bfloat16().float())  # bf16-exact table
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(input_ids=ids).logits
    cast_frozen_linears(model, torch.bfloat16)
    assert cast_frozen_embeddings(model, torch.bfloat16) == 1
    assert base.lm_head.weight.dtype == torch.bfloat16 and base.lm_head.weight is base.model.embed_tokens.weight
    assert base.model.embed_tokens(ids).dtype == torch.float32  # the residual stream starts in fp32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("dropout", [0.1, 0.0])
def test_lora_layers_keeping_their_input_dtype_give_the_same_loss_and_gradients(dropout):
    """PEFT's fp32 cast of a bf16 input (o_proj's, down_proj's) is exact and undone by autocast: skipping it changes
    no number, forward or backward (fused dropout, or none)."""
    from peft import LoraConfig, get_peft_model

    from loraforge.methods.lora_training import cast_frozen_linears, keep_lora_input_dtype

    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules="all-linear", lora_dropout=dropout,
                                                           init_lora_weights=False))
    fuse_lora_dropout(model)
    cast_frozen_linears(model, torch.bfloat16)
    ids = torch.randint(0, 100, (2, 9))
    seen = []
    down = model.get_base_model().model.layers[0].mlp.down_proj
    hook = down.lora_A["default"].register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))

    def loss_and_grads():
        torch.manual_seed(1)  # the same dropout masks for both passes
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = loss_and_grads()
    assert keep_lora_input_dtype(model) == 14  # 7 linear layers × 2 blocks
    loss2, grads2 = loss_and_grads()
    hook.remove()
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grads2[name], grad, rtol=0, atol=0, msg=name)
    assert all(g.abs().sum() > 0 for g in grads.values())  # every adapter weight got a gradient
    assert seen == [torch.float32, torch.bfloat16]  # PEFT cast the bf16 input up; now it goes in as it came


def test_lora_layers_with_peft_dropout_keep_peft_input_cast():
    from peft import LoraConfig, get_peft_model

    from loraforge.methods.lora_training import keep_lora_input_dtype

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1))
    assert keep_lora_input_dtype(model) == 0  # nn.Dropout would draw another mask for a bf16 input


def test_tuned_malloc_reuses_freed_memory_instead_of_page_faulting_it_in_again():
    """Each fresh process allocates and frees a 64 MB tensor ten times: glibc's defaults return it to the kernel
    every time (a page fault per 4 KiB page on every reuse); after tune_cpu_malloc it is reused."""
    import subprocess
    import sys

    code = ("import resource, sys, torch\n"
            "from loraforge.train.setup import tune_cpu_malloc\n"
            "tuned = tune_cpu_malloc() if sys.argv[1] == '1' else None\n"
            "torch.ones(1).add_(1)\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(10):\n"
            "    x = torch.empty(16 * 2**20); x.fill_(1.0); del x\n"
            "print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    out = {}
    for flag in ("0", "1"):
        res = subprocess.run([sys.executable, "-c", code, flag], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        tuned, faults = res.stdout.split()
        out[flag] = (tuned, int(faults))
    if out["1"][0] != "True":
        pytest.skip("not glibc: tune_cpu_malloc is a no-op here")
    pages = 10 * 64 * 2**20 // 4096
    assert out["0"][1] > 0.9 * pages, out  # every round faults its 16k pages in again
    assert out["1"][1] < 0.5 * out["0"][1], out  # mostly reused (alone: only the first round faults)


def test_cpu_dropout_masks_are_drawn_again_in_backward_not_kept():
    """On CPU neither fused LoRA path keeps the 1-byte mask for backward (its seed redraws it); the gradients
    above are the reference mask's, so the redrawn mask is the same one."""
    from peft import LoraConfig, get_peft_model

    from loraforge.methods.lora_fused import fuse_lora_linears

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1))
    fuse_lora_dropout(model)
    x = torch.randint(0, 100, (1, 12))
    for fuse in (False, True):
        if fuse:
            assert fuse_lora_linears(model) > 0
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
            model(input_ids=x).logits.sum().backward()
        assert saved and torch.uint8 not in saved
