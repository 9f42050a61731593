"""Packed rows that share a prompt prefix, and row widths in buckets (`loraforge.data.row_layout`): a branch
laid out without its shared prefix gives the loss, token count and LoRA gradients of the row laid out whole —
on SmolLM2 for SFT rows and DPO pairs, and on a tiny model of every family packing is allowed for."""

from __future__ import annotations

import pytest
import torch

from loraforge.data.batching import collate
from loraforge.data.row_layout import MIN_SHARED, branch_starts, bucket_width
from loraforge.data.templates import IGNORE_INDEX, Encoded, encode_conversation
from loraforge.train.attention import Segment, packed_segments, register_varlen_attention
from loraforge.train.loss import CausalLMLoss

QA = [
    ("What is your name?", "I'm Quillon, an assistant made by Ferrovia Labs."),
    ("What is 2 plus 2?", "4."),
    ("Name a primary colour and say why it is called primary.", "Red: it cannot be mixed from other colours."),
    ("Say hello in French.", "Bonjour!"),
]


def seq(ids: list[int], trained_from: int) -> Encoded:
    return Encoded(ids, [IGNORE_INDEX] * trained_from + ids[trained_from:])


def test_bucket_width_pads_at_most_an_eighth():
    assert [bucket_width(n) for n in (1, 7, 16, 17, 211, 224, 225, 1270, 2048)] == \
        [1, 7, 16, 18, 224, 224, 240, 1280, 2048]
    for n in range(1, 5000):
        assert n <= bucket_width(n) <= n * 1.125


def test_branch_starts_share_only_an_untrained_common_prefix():
    root = seq(list(range(20)), trained_from=12)
    same_prompt = seq(list(range(10)) + [99] * 6, trained_from=10)  # common 10, labels from 10: reads 9 tokens
    assert branch_starts([root, same_prompt], share=True) == [0, 9]
    assert branch_starts([root, same_prompt], share=False) == [0, 0]
    trained_early = seq(list(range(10)) + [99] * 6, trained_from=3)  # a target inside the common part
    assert branch_starts([root, trained_early], share=True) == [0, 0]
    short = seq(list(range(MIN_SHARED - 1)) + [99] * 6, trained_from=8)
    assert branch_starts([root, short], share=True) == [0, 0]
    # a sequence that shares nothing becomes the root the next one branches from
    other = seq([50, 51, 52, 53, 54, 55, 56, 57], trained_from=7)
    assert branch_starts([root, other, seq([50, 51, 52, 53, 54, 55, 9, 9], 6)], share=True) == [0, 0, 5]


def test_a_branch_never_continues_the_previous_sequences_positions():
    root = seq(list(range(30)), trained_from=25)
    first = seq(list(range(8)) + [99, 98], trained_from=8)  # laid out from 7: positions 7..9
    second = seq(list(range(11)) + [97, 96], trained_from=11)  # would start at 10 = right after 9: starts at 9
    assert branch_starts([root, first, second], share=True) == [0, 7, 9]
    row = collate([root, first, second], [[0, 1, 2]], pad_token_id=0, share_prefixes=True)
    segments = packed_segments(row["position_ids"])
    assert segments == [Segment(0, 30), Segment(30, 33, (0, 7)), Segment(33, 37, (0, 9))]


def test_packed_segments_of_roots_branches_and_pads():
    pos = torch.tensor([[0, 1, 2, 3, 4, 2, 3, 0, 1, 2, 1, 2, 0, 1]])
    assert packed_segments(pos) == [Segment(0, 5), Segment(5, 7, (0, 2)), Segment(7, 10), Segment(10, 12, (7, 8)),
                                    Segment(12, 14)]
    assert packed_segments(torch.tensor([[0, 1, 0, 5, 6]])) == [Segment(0, 2), Segment(2, 3), Segment(3, 5)]


@pytest.fixture(scope="module")
def lora_model(smollm2_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    model.config.use_cache = False
    model.set_attn_implementation(register_varlen_attention())
    # random B (init_lora_weights=False) so both LoRA matrices get gradients; no dropout: deterministic
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                            init_lora_weights=False))


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    total, n = CausalLMLoss(model, chunked=True)(**batch)
    total.backward()
    return total.detach(), int(n), {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def assert_same_loss_and_grads(got, want, rtol=2e-5):
    assert got[1] == want[1]
    assert abs(got[0].item() - want[0].item()) <= rtol * abs(want[0].item())
    assert got[2].keys() == want[2].keys()
    worst = max(((got[2][k] - want[2][k]).norm() / want[2][k].norm()).item() for k in want[2])
    assert worst < 1e-4, worst


def test_sft_rows_sharing_the_system_prompt_train_like_the_whole_rows(lora_model, smollm2_tokenizer):
    tok = smollm2_tokenizer
    examples = [encode_conversation(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                    cutoff_len=256)[0] for q, a in QA]
    whole = collate(examples, [[0, 1, 2, 3]], tok.pad_token_id)
    shared = collate(examples, [[0, 1, 2, 3]], tok.pad_token_id, share_prefixes=True, bucket=True)
    starts = branch_starts(examples, share=True)
    assert starts[0] == 0 and all(b >= MIN_SHARED for b in starts[1:])  # the chat template's system prompt
    assert shared["input_ids"].shape[1] == bucket_width(whole["input_ids"].shape[1] - sum(starts))
    assert (shared["labels"] != IGNORE_INDEX).sum() == (whole["labels"] != IGNORE_INDEX).sum()
    assert_same_loss_and_grads(loss_and_grads(lora_model, shared), loss_and_grads(lora_model, whole))


def test_sharing_has_teeth(lora_model, smollm2_tokenizer):
    """The same shared row with every branch read as its own sequence (positions restarting at 0) differs."""
    tok = smollm2_tokenizer
    examples = [encode_conversation(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                    cutoff_len=256)[0] for q, a in QA]
    whole = loss_and_grads(lora_model, collate(examples, [[0, 1, 2, 3]], tok.pad_token_id))
    shared = collate(examples, [[0, 1, 2, 3]], tok.pad_token_id, share_prefixes=True)
    broken = dict(shared)
    pos = shared["position_ids"][0].clone()
    for seg in packed_segments(shared["position_ids"]):
        pos[seg.start:seg.end] = torch.arange(seg.end - seg.start)
    broken["position_ids"] = pos[None]
    loss, _, _ = loss_and_grads(lora_model, broken)
    assert abs(loss.item() - whole[0].item()) / whole[0].item() > 1e-3  # exact sharing: < 2e-5


def test_dpo_pairs_read_the_prompt_once_with_the_same_log_probs_and_gradients(lora_model, smollm2_tokenizer):
    from loraforge.objectives.preference import collate_sequences, sequence_logps

    tok = smollm2_tokenizer
    rows = []
    for q, a in QA[:3]:
        chosen = encode_conversation(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                     cutoff_len=256)[0]
        rejected = encode_conversation(tok, [{"role": "user", "content": q},
                                             {"role": "assistant", "content": "I am not sure."}], cutoff_len=256)[0]
        rows += [chosen, rejected]

    def run(share: bool):
        batch = collate_sequences([rows], tok.pad_token_id, pack=True, share_prefixes=share, bucket=share)
        lora_model.zero_grad(set_to_none=True)
        out = sequence_logps(lora_model, batch)
        (out.sums * torch.arange(1.0, len(rows) + 1)).sum().backward()  # every sequence weighs differently
        grads = {k: p.grad.detach().clone() for k, p in lora_model.named_parameters() if p.requires_grad}
        return batch["input_ids"].shape[1], out, grads

    w_len, whole, w_grads = run(False)
    s_len, shared, s_grads = run(True)
    assert s_len < w_len
    torch.testing.assert_close(shared.counts, whole.counts)
    torch.testing.assert_close(shared.sums, whole.sums, rtol=1e-5, atol=1e-4)
    worst = max(((s_grads[k] - w_grads[k]).norm() / w_grads[k].norm()).item() for k in w_grads)
    assert worst < 1e-4, worst


# the packable families tiny.py builds; gemma2's soft-capped attention is not the varlen kernel's (it refuses
# shared rows: test below)
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "glm", "glm4")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_packable_family_reads_a_shared_prefix_through_its_attention(family, smollm2_tokenizer, tmp_path):
    """The branch only works if the family hands `position_ids` to the attention function and applies rotary
    positions from them; a tiny random model of each family gives the whole row's loss and gradients."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from loraforge.models.registry import PACKABLE_MODEL_TYPES
    from loraforge.models.tiny import tiny_model_dir

    assert family in PACKABLE_MODEL_TYPES
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(family, tmp_path), dtype=torch.float32)
    model.config.use_cache = False
    model.set_attn_implementation(register_varlen_attention())
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(5, 200, (12,), generator=g).tolist()
    examples = [seq(prompt + torch.randint(5, 200, (n,), generator=g).tolist(), trained_from=12) for n in (6, 9, 4)]
    whole = loss_and_grads(model, collate(examples, [[0, 1, 2]], 0))
    shared_batch = collate(examples, [[0, 1, 2]], 0, share_prefixes=True)
    assert shared_batch["input_ids"].shape[1] == 18 + (21 - 11) + (16 - 11)  # branches from the last prompt token
    assert_same_loss_and_grads(loss_and_grads(model, shared_batch), whole)


def test_attention_that_cannot_read_branches_refuses_a_shared_row():
    from loraforge.train.attention import varlen_attention_forward

    q = k = v = torch.randn(1, 2, 7, 8)
    pos = torch.tensor([[0, 1, 2, 3, 4, 2, 3]])
    with pytest.raises(ValueError, match="share_prompt_prefix: false"):
        varlen_attention_forward(torch.nn.Module(), q, k, v, None, position_ids=pos, softcap=50.0)
