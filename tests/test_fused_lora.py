"""The fused LoRA linear (methods/lora_fused.py) computes what PEFT's `lora.Linear` computes — output and the input,
A, B and bias gradients; exactly in fp32, to bf16 precision under autocast with bf16 frozen weights — leaves
the saved adapter plain PEFT, refuses the layers it cannot compute, and gives a training run the same losses."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from test_perf_kernels import rel_err, tiny_model
from test_train_helpers import adapter, assert_losses_close, build, make_cfg, max_weight_diff, rows_file, run, \
    tiny_llama, train_losses  # noqa: F401
from torch import nn

from loraforge.methods.lora_dropout import fuse_lora_dropout
from loraforge.methods.lora_fused import FusedLoraLinear, fuse_lora_linears
from loraforge.methods.lora_training import cast_frozen_linears


class _Proj(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.proj = nn.Linear(24, 40, bias=bias)

    def forward(self, x):
        return self.proj(x)


def _layer_pair(bias: bool, p: float, rslora: bool):
    """(PEFT's layer, the same layer fused): one LoRA-wrapped nn.Linear, B nonzero, dropout as a mask."""
    torch.manual_seed(0)
    net = get_peft_model(_Proj(bias), LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=["proj"],
                                                 init_lora_weights=False, use_rslora=rslora,
                                                 bias="all" if bias else "none"))
    fuse_lora_dropout(net)
    fused = copy.deepcopy(net)
    assert fuse_lora_linears(fused) == 1
    return net, fused


def _layer_grads(net, x0, seed):
    x = x0.clone().requires_grad_()
    torch.manual_seed(seed)  # the same dropout mask for both layers
    y = net(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    layer = net.base_model.model.proj
    grads = {"x": x.grad, "A": layer.lora_A["default"].weight.grad, "B": layer.lora_B["default"].weight.grad}
    if layer.base_layer.bias is not None:
        grads["bias"] = layer.base_layer.bias.grad
    return y.detach(), grads


@pytest.mark.parametrize("bias, p, rslora", [(False, 0.0, False), (True, 0.0, True), (True, 0.3, False)])
def test_fused_layer_equals_peft_layer_in_fp32(bias, p, rslora):
    net, fused = _layer_pair(bias, p, rslora)
    x0 = torch.randn(3, 7, 24)
    y, grads = _layer_grads(net, x0, seed=5)
    yf, grads_f = _layer_grads(fused, x0, seed=5)
    torch.testing.assert_close(yf, y, rtol=1e-6, atol=1e-6)
    assert set(grads_f) == set(grads) == {"x", "A", "B"} | ({"bias"} if bias else set())
    for name, grad in grads.items():
        torch.testing.assert_close(grads_f[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    if p:
        with torch.no_grad():
            assert not torch.allclose(fused.eval()(x0), yf)  # dropout was on in training, and off in eval
    # the scale is the one PEFT uses (alpha / r, or alpha / sqrt(r) for rsLoRA): a wrong one would have failed
    assert fused.base_model.model.proj.scaling["default"] == (8 / 2 if rslora else 8 / 4)


@pytest.mark.parametrize("family, bias", [("llama", "none"), ("qwen2", "all")])
def test_fused_model_equals_peft_model_in_fp32(family, bias):
    """Every adapted linear of a tiny model (qwen2: q/k/v with trainable biases), loss and every gradient."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_model(family), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias=bias,
                                                          target_modules="all-linear", init_lora_weights=False))
    fused = copy.deepcopy(model)
    assert fuse_lora_linears(fused) == 7 * model.config.num_hidden_layers
    ids = torch.randint(0, 100, (2, 9))
    results = []
    for m in (model, fused):
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    (loss, grads), (loss_f, grads_f) = results
    torch.testing.assert_close(loss_f, loss, rtol=1e-6, atol=1e-6)
    assert grads_f.keys() == grads.keys() and any(".bias" in n for n in grads) == (bias == "all")
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_f[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_model_under_bf16_with_bf16_frozen_weights_is_as_close_to_fp32_as_peft():
    """The training setup of a bf16 run (frozen linears stored in bf16, adapters fp32, autocast): the fused layers'
    loss, input and adapter gradients are no further from the fp32 math on the same weights than PEFT's own."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                           target_modules="all-linear", init_lora_weights=False))
    fuse_lora_dropout(model)
    cast_frozen_linears(model, torch.bfloat16)
    fused, fp32 = copy.deepcopy(model), copy.deepcopy(model)
    assert fuse_lora_linears(fused) == 14
    cast_frozen_linears(fp32, torch.float32)  # the same bf16-rounded weights, computed in fp32
    assert fp32.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.float32
    ids = torch.randint(0, 100, (2, 9))
    embeds0 = model.get_input_embeddings()(ids).detach()
    results = []
    for m, autocast in ((fp32, False), (model, True), (fused, True)):
        embeds = embeds0.clone().requires_grad_()
        torch.manual_seed(1)  # the same dropout masks
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = m(inputs_embeds=embeds, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
        results.append((loss.detach(), embeds.grad, grads))
    (loss, x_grad, grads), (loss_p, x_grad_p, grads_p), (loss_f, x_grad_f, grads_f) = results
    assert all(g.dtype == torch.float32 for g in grads_f.values())

    def worst(errors):  # largest relative error over the input and the adapter gradients
        return max(errors(x_grad, "x"), *(errors(g, n) for n, g in grads.items()))

    peft_err = worst(lambda ref, n: rel_err(x_grad_p if n == "x" else grads_p[n], ref))
    fused_err = worst(lambda ref, n: rel_err(x_grad_f if n == "x" else grads_f[n], ref))
    assert 1e-3 < peft_err < 0.1  # bf16 noise, and a real one: the fp32 pass did compute in fp32
    assert fused_err <= 1.25 * peft_err, (fused_err, peft_err)
    assert abs(loss_f - loss) <= 1.25 * abs(loss_p - loss) + 1e-4 * loss


def test_fused_model_keeps_keys_and_saves_an_adapter_plain_peft_loads(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                           target_modules="all-linear"))
    keys = {k: v.shape for k, v in model.state_dict().items()}
    fuse_lora_dropout(model)
    assert fuse_lora_linears(model) == 14
    assert fuse_lora_linears(model) == 0  # idempotent
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    ids = torch.randint(0, 100, (2, 9))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=ids, labels=ids).loss.backward()  # train B away from zero, through the fused layers
    optimizer.step()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "fused")
    plain = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                           target_modules="all-linear"))
    plain.save_pretrained(tmp_path / "plain")
    saved, reference = adapter(tmp_path / "fused"), adapter(tmp_path / "plain")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in reference.items()}
    fresh = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "fused").eval()
    assert not any(isinstance(m, FusedLoraLinear) for m in fresh.modules())
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, trained, rtol=1e-5, atol=1e-5)


def test_layers_the_fusion_cannot_compute_keep_peft_forward(tmp_path):
    lora = dict(r=4, init_lora_weights=False)
    assert fuse_lora_linears(get_peft_model(tiny_model("llama"), LoraConfig(
        lora_dropout=0.0, use_dora=True, target_modules=["q_proj"], **lora))) == 0  # DoRA
    assert fuse_lora_linears(get_peft_model(tiny_model("gpt2"), LoraConfig(
        lora_dropout=0.0, target_modules=["c_attn"], fan_in_fan_out=True, **lora))) == 0  # Conv1D
    assert fuse_lora_linears(get_peft_model(tiny_model("llama"), LoraConfig(
        lora_dropout=0.1, target_modules=["q_proj"], **lora))) == 0  # PEFT's own nn.Dropout mask stays PEFT's
    two = get_peft_model(tiny_model("llama"), LoraConfig(lora_dropout=0.0, target_modules=["q_proj"], **lora))
    two.add_adapter("other", LoraConfig(lora_dropout=0.0, target_modules=["q_proj"], **lora))
    assert fuse_lora_linears(two) == 0  # several adapters on a layer


def test_quantized_base_layers_are_not_fused(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from loraforge.models.tiny import tiny_model_dir

    path = tiny_model_dir("llama", tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    assert sum("lora_A" in n for n, _ in model.named_parameters()) == 4
    assert fuse_lora_linears(model) == 0


def test_disabled_merged_or_several_active_adapters_fall_back_to_peft():
    """What changes after fusing goes through PEFT's own forward, so it computes what PEFT would."""
    torch.manual_seed(0)
    lora = dict(r=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(tiny_model("llama"), LoraConfig(**lora)).eval()
    fused = copy.deepcopy(model)
    assert fuse_lora_linears(fused) == 4
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        with model.disable_adapter(), fused.disable_adapter():
            torch.testing.assert_close(fused(input_ids=ids).logits, model(input_ids=ids).logits)
        for m in (model, fused):
            torch.manual_seed(1)  # the same second adapter
            m.add_adapter("other", LoraConfig(**lora))
            m.base_model.set_adapter(["default", "other"])
        both = model(input_ids=ids).logits
        torch.testing.assert_close(fused(input_ids=ids).logits, both, rtol=1e-6, atol=1e-6)
        fused.base_model.set_adapter("default")
        assert not torch.allclose(fused(input_ids=ids).logits, both)  # the second adapter counted above


# gradient checkpointing recomputes the forward: the recomputed dropout masks must be the first pass's
@pytest.mark.parametrize("extra", [{}, {"gradient_checkpointing": True}, {"use_rslora": True, "precision": "bf16"}])
def test_training_with_and_without_fusion_gives_the_same_losses(tiny_llama, rows_file, tmp_path, extra):
    """Fused by default; a short run (dropout on, all linear layers) gives the unfused run's losses and adapter."""
    overrides = dict(lora_dropout=0.1, target_modules="all-linear", **extra)
    fused_model, _, _ = build(make_cfg(tiny_llama, rows_file, tmp_path / "f", **overrides), tiny_llama)
    assert sum(isinstance(m, FusedLoraLinear) for m in fused_model.modules()) == 14
    plain_model, _, _ = build(make_cfg(tiny_llama, rows_file, tmp_path / "p", fused_lora_linear=False,
                                       **overrides), tiny_llama)
    assert not any(isinstance(m, FusedLoraLinear) for m in plain_model.modules())

    run(tiny_llama, rows_file, tmp_path / "fused", **overrides)
    run(tiny_llama, rows_file, tmp_path / "plain", fused_lora_linear=False, **overrides)
    fused, plain = train_losses(tmp_path / "fused"), train_losses(tmp_path / "plain")
    assert len(fused) == 4
    bf16 = extra.get("precision") == "bf16"
    assert_losses_close(fused, plain, tol=2e-3 * max(plain.values()) if bf16 else 1e-5)
    if not bf16:  # under bf16, Adam's normalized steps magnify rounding differences of near-zero gradients
        assert max_weight_diff(adapter(tmp_path / "fused"), adapter(tmp_path / "plain")) < 1e-5
