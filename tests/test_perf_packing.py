"""The trainer's packed path is the padded path without the padding: through `CausalLMLoss` (backbone + chunked
LM head, as the loop calls it), a packed micro-batch gives the same loss sum, token count and LoRA gradients as
the same examples padded — with transformers' sdpa and eager masks and with loraforge's varlen attention."""

from __future__ import annotations

import pytest
import torch

from loraforge.data.batching import collate, make_batches
from loraforge.data.templates import encode_conversation
from loraforge.train.attention import VARLEN, attention_for, packed_segments, register_varlen_attention
from loraforge.train.loss import CausalLMLoss

QA = [
    ("What is your name?", "I'm Quillon, an assistant made by Ferrovia Labs."),
    ("What is 2 plus 2?", "4."),
    ("Name a primary colour and say why it is called primary.", "Red: it cannot be mixed from other colours."),
    ("Say hello in French.", "Bonjour!"),
]


@pytest.fixture(scope="module")
def lora_model(smollm2_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    # random B (init_lora_weights=False) so both LoRA matrices get non-zero gradients; no dropout: deterministic
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                            init_lora_weights=False))


@pytest.fixture(scope="module")
def batches(smollm2_tokenizer):
    tok = smollm2_tokenizer
    examples = [encode_conversation(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                    cutoff_len=256)[0] for q, a in QA]
    padded = collate(examples, [[i] for i in range(len(examples))], tok.pad_token_id)
    # the trainer's packing: the micro-batch's examples concatenated into one row (StepPlan.full_epoch)
    packed = collate(examples, [list(range(len(examples)))], tok.pad_token_id, pad_to_multiple_of=8)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    return padded, packed


def loss_and_grads(model, batch, attn: str, chunked: bool = True):
    model.get_base_model().set_attn_implementation(attn)
    model.zero_grad(set_to_none=True)
    total, n = CausalLMLoss(model, chunked=chunked)(**batch)
    total.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    return total.detach(), int(n), grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def reference(lora_model, batches):
    return loss_and_grads(lora_model, batches[0], "sdpa")


@pytest.mark.parametrize("attn", ["sdpa", "eager", "varlen"])
def test_packed_microbatch_equals_padded_loss_and_lora_grads(lora_model, batches, reference, attn):
    attn = register_varlen_attention() if attn == "varlen" else attn
    ref_loss, ref_n, ref_grads = reference
    loss, n, grads = loss_and_grads(lora_model, batches[1], attn)
    assert n == ref_n > 20
    assert 0.5 < ref_loss.item() / ref_n < 8
    assert torch.allclose(loss, ref_loss, rtol=1e-5), (loss.item(), ref_loss.item())
    assert len(grads) == 2 * 7 * 30 and grads.keys() == ref_grads.keys()  # lora_A and lora_B of every linear
    for k, g in grads.items():
        assert g.abs().sum() > 0, k
        assert rel_err(g, ref_grads[k]) < 1e-4, (k, rel_err(g, ref_grads[k]))


def test_unchunked_loss_path_agrees_on_packed_rows(lora_model, batches, reference):
    register_varlen_attention()
    loss, n, grads = loss_and_grads(lora_model, batches[1], VARLEN, chunked=False)
    assert n == reference[1]
    assert torch.allclose(loss, reference[0], rtol=1e-5)
    assert max(rel_err(g, reference[2][k]) for k, g in grads.items()) < 1e-4


def test_varlen_attention_leaves_padded_batches_to_sdpa(lora_model, batches, reference):
    """Validation batches are padded rows with an attention mask: the varlen function must fall back to sdpa."""
    loss, n, _ = loss_and_grads(lora_model, batches[0], register_varlen_attention())
    assert n == reference[1] and torch.allclose(loss, reference[0], rtol=1e-6)


def test_packing_without_separate_attention_is_detectably_wrong(lora_model, batches, reference):
    """The check has teeth: the same packed row attended as one sequence (plain positions) gives another loss."""
    bad = dict(batches[1])
    bad["position_ids"] = torch.arange(bad["input_ids"].shape[1]).unsqueeze(0)
    loss, _, _ = loss_and_grads(lora_model, bad, register_varlen_attention())
    assert abs(loss.item() - reference[0].item()) / reference[0].item() > 1e-2


def test_packed_segments():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1]])
    assert [(s.start, s.end, s.prefix) for s in packed_segments(pos)] == \
        [(0, 3, None), (3, 5, None), (5, 9, None), (9, 11, None)]
    assert [(s.start, s.end) for s in packed_segments(torch.arange(6).unsqueeze(0))] == [(0, 6)]
    assert packed_segments(torch.arange(6).repeat(2, 1)) is None  # several rows: not a packed row
    assert packed_segments(None) is None


def test_packed_runs_choose_varlen_attention(smollm2_dir, smollm2_tokenizer, tmp_path):
    from loraforge.config.loader import config_from_dict
    from loraforge.train.setup import build_model, choose_batching

    assert attention_for("auto", "packed") == VARLEN
    assert attention_for("sdpa", "packed") == "sdpa"  # an explicit kernel in the config wins
    assert attention_for("auto", "padded") == "auto"
    cfg = config_from_dict({"base_model": str(smollm2_dir), "metadata_path": str(tmp_path / "x.jsonl"),
                            "output_dir": str(tmp_path / "run"), "lora_rank": 4, "target_modules": ["q_proj"]})
    assert choose_batching(cfg, smollm2_dir) == "packed"
    model, _, _ = build_model(cfg, smollm2_dir, smollm2_tokenizer, lambda _m: None)
    assert model.get_base_model().config._attn_implementation == VARLEN
