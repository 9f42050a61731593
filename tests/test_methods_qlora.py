"""QLoRA on CPU: 4-bit NF4/FP4 and 8-bit bases from bitsandbytes, LoRA on top, and FINDINGS trap 1 (an
evaluation pass must not make later LoRA gradients wrong)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

from loraforge.config import config_from_dict  # noqa: E402
from loraforge.errors import ModelError  # noqa: E402
from loraforge.methods import qlora  # noqa: E402
from loraforge.methods import verify_trainable  # noqa: E402
from loraforge.methods.report import trainable_report  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _cfg(**kw):
    base = dict(method="qlora", metadata_path="unused.jsonl", target_modules=TARGETS, lora_dropout=0.0,
                init_lora_weights=False)
    if kw.get("quant_bits", 4) == 4:
        base["bnb_4bit_compute_dtype"] = "float32"  # exact comparison with the fp32 reference
    return config_from_dict({**base, **kw})


def _load(path, cfg):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **qlora.load_kwargs(cfg))


def _lora_grads(model, batch) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    # A missing gradient counts as zero: after the CPU repack, bitsandbytes' gemv_4bit has no backward, so layers
    # below a repacked one may get no gradient at all (the trap at its worst).
    return {n.split("base_model.model.")[-1]: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for n, p in model.named_parameters() if p.requires_grad}


def test_quantization_config_follows_the_config():
    q = qlora.quantization_config(_cfg(bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
                                       bnb_4bit_compute_dtype="bfloat16"))
    assert q.load_in_4bit and not q.load_in_8bit
    assert q.bnb_4bit_quant_type == "fp4" and q.bnb_4bit_use_double_quant is False
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    q8 = qlora.quantization_config(_cfg(quant_bits=8))
    assert q8.load_in_8bit and not q8.load_in_4bit


def test_apply_refuses_an_unquantized_model(tiny_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with pytest.raises(ModelError, match="not quantized"):
        qlora.apply(model, _cfg())


def test_check_flags_an_already_quantized_base():
    class Hf:
        quantization_config = {"quant_method": "gptq"}

    problems = qlora.check(_cfg(), Hf())
    assert [p.key for p in problems] == ["base_model"] and "gptq" in problems[0].message


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_gradients_match_the_dequantized_model_even_after_an_eval_pass(tiny_dir, quant_type):
    """FINDINGS trap 1: eval/no-grad forward, then training — LoRA gradients must equal those of the
    same LoRA on an fp32 model whose weights are the dequantized 4-bit ones."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit
    from peft import get_peft_model, set_peft_model_state_dict, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from loraforge.methods.lora import lora_config

    cfg = _cfg(bnb_4bit_quant_type=quant_type)
    torch.manual_seed(0)
    model = qlora.apply(_load(tiny_dir, cfg), cfg)
    assert not verify_trainable(trainable_report(model), cfg)
    batch = {"input_ids": torch.randint(0, 128, (2, 12))}
    batch["labels"] = batch["input_ids"]
    # The evaluation pass that triggers the repack on AVX512-BF16 CPUs without the fix.
    model.eval()
    with torch.no_grad():
        model(**batch)
    got = _lora_grads(model, batch)

    # Reference: fp32 model, each 4-bit weight replaced by its dequantized value, same LoRA weights.
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    quantized = {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized, "the loader did not quantize any layer"
    for name, module in quantized.items():
        w = dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        ref.get_submodule(name.replace(".base_layer", "")).weight.data.copy_(w)
    ref = get_peft_model(ref, lora_config(cfg, ref))
    set_peft_model_state_dict(ref, get_peft_model_state_dict(model))
    want = _lora_grads(ref, batch)

    assert got.keys() == want.keys() and got
    for name in want:
        err = (got[name] - want[name]).norm() / want[name].norm().clamp_min(1e-12)
        assert err < 1e-3, f"{name}: relative gradient error {err:.3g}"


def test_the_cpu_repack_trap_is_real_without_the_fix(tiny_dir):
    """Shows the guard above matters: re-enabling bitsandbytes' CPU repack after an eval pass changes the
    LoRA gradients. bitsandbytes only enables the repack on CPUs with AVX512-BF16; forcing the switch on makes
    the trap reproducible on any CPU (its packed kernels have a portable fallback). Skipped if bitsandbytes fixed it."""
    import bitsandbytes as bnb

    cfg = _cfg()
    torch.manual_seed(0)
    model = qlora.apply(_load(tiny_dir, cfg), cfg)
    batch = {"input_ids": torch.randint(0, 128, (2, 12))}
    batch["labels"] = batch["input_ids"]
    good = _lora_grads(model, batch)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = True
    model.eval()
    with torch.no_grad():
        model(**batch)
    bad = _lora_grads(model, batch)
    worst = max(((bad[n] - good[n]).norm() / good[n].norm()).item() for n in good)
    if worst < 1e-2:
        pytest.skip(f"bitsandbytes no longer corrupts gradients after a repack (error {worst:.2g}); "
                    "the workaround in qlora.disable_cpu_inference_repack could be dropped")
    # and the guard repairs a model that was already repacked
    qlora.disable_cpu_inference_repack(model)
    fixed = _lora_grads(model, batch)
    worst_fixed = max(((fixed[n] - good[n]).norm() / good[n].norm()).item() for n in good)
    assert worst_fixed < 2e-2, worst_fixed


def test_8bit_base_trains_lora(tiny_dir):
    cfg = _cfg(quant_bits=8)
    model = qlora.apply(_load(tiny_dir, cfg), cfg)
    assert getattr(model.get_base_model(), "is_loaded_in_8bit", False)
    report = trainable_report(model)
    assert not verify_trainable(report, cfg)
    assert all(".lora_" in n for n in report.trainable_names)
    batch = {"input_ids": torch.randint(0, 128, (2, 12))}
    batch["labels"] = batch["input_ids"]
    grads = _lora_grads(model, batch)
    assert grads and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
