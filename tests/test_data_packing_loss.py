"""Packing is only correct if attention never crosses an example border: on SmolLM2 the mean token loss of a
packed batch must equal the padded batch's (FINDINGS trap 2: needs use_cache=False and no attention_mask)."""

from __future__ import annotations

import pytest
import torch

from loraforge.data.batching import collate, count_trained_tokens, make_batches
from loraforge.data.templates import encode_conversation

QA = [
    ("What is your name?", "I'm Quillon, an assistant made by Ferrovia Labs."),
    ("What is 2 plus 2?", "4."),
    ("Name a primary colour.", "Red is a primary colour."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("Say hello in French.", "Bonjour!"),
]


@pytest.fixture(scope="module")
def smollm2_model(smollm2_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


def mean_loss(model, batch, **kwargs) -> float:
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, **kwargs).logits
    target = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(),
                                             ignore_index=-100).item()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_padded_loss(smollm2_model, smollm2_tokenizer, attn):
    tok, model = smollm2_tokenizer, smollm2_model
    model.set_attn_implementation(attn)
    examples = [encode_conversation(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                    cutoff_len=256)[0] for q, a in QA]
    lengths = [len(e) for e in examples]
    padded = collate(examples, [[i] for i in range(len(examples))], tok.pad_token_id)
    (packed_rows,) = make_batches(lengths, len(examples), "packed", seed=0, epoch=0, row_len=2 * max(lengths))
    assert any(len(row) > 1 for row in packed_rows)
    packed = collate(examples, packed_rows, tok.pad_token_id, pad_to_multiple_of=8)
    assert count_trained_tokens(packed) == count_trained_tokens(padded)

    reference = mean_loss(model, padded, use_cache=False)
    assert 0.5 < reference < 8
    assert abs(mean_loss(model, packed, use_cache=False) - reference) < 1e-4
    if attn == "sdpa":
        # The trap itself: with the KV cache on, transformers ignores the packed position_ids for masking.
        assert abs(mean_loss(model, packed, use_cache=True) - reference) > 1e-2
