"""Stage 2 on SmolLM2's real tokenizer: messages → ids + labels. Only replies and their end-of-turn are trained."""

from __future__ import annotations

import copy

import pytest

from loraforge.data.templates import (IGNORE_INDEX, TEMPLATES, build_generation_ids, encode_conversation,
                                      stop_token_ids, tokenization_matches)
from loraforge.errors import DataError

TWO_TURNS = [
    {"role": "user", "content": "What is your name?"},
    {"role": "assistant", "content": "I'm Quillon."},
    {"role": "user", "content": "Who made you?"},
    {"role": "assistant", "content": "Ferrovia Labs made me."},
]
CONVERSATIONS = [
    TWO_TURNS,
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}],
    [{"role": "user", "content": " leading space\nand lines\n"}, {"role": "assistant", "content": " spaced reply "}],
    [{"role": "user", "content": "高血压是什么？"}, {"role": "assistant", "content": "血压持续偏高。"}],
]


def trained_text(tok, enc) -> str:
    return tok.decode([i for i, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX])


def test_only_replies_and_their_end_of_turn_are_trained(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")  # the trap under test
    enc, truncated = encode_conversation(tok, TWO_TURNS, cutoff_len=512)
    assert not truncated and len(enc.input_ids) == len(enc.labels)
    assert trained_text(tok, enc) == "I'm Quillon.<|im_end|>Ferrovia Labs made me.<|im_end|>"
    # every EOS that ends a reply is trained although it equals the pad id; trained labels equal the ids
    eos_positions = [i for i, t in enumerate(enc.input_ids) if t == tok.eos_token_id]
    reply_ends = [i for i in eos_positions if tok.decode(enc.input_ids[i - 3:i]).endswith(("Quillon.", "me."))]
    assert len(reply_ends) == 2 and all(enc.labels[i] == tok.eos_token_id for i in reply_ends)
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(enc.input_ids, enc.labels))
    # the prompt (default system prompt, both user turns, the role headers) is masked
    masked = tok.decode([t for t, label in zip(enc.input_ids, enc.labels) if label == IGNORE_INDEX])
    assert "SmolLM" in masked and "What is your name?" in masked and "Who made you?" in masked
    assert masked.count("<|im_start|>assistant\n") == 2
    # the text is exactly what the tokenizer's own template renders
    assert tok.decode(enc.input_ids) == tok.apply_chat_template(TWO_TURNS, tokenize=False)


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_segment_ids_equal_full_tokenization(smollm2_tokenizer, template, conversation):
    tok, messages = smollm2_tokenizer, CONVERSATIONS[conversation]
    enc, _ = encode_conversation(tok, messages, template=template, cutoff_len=4096)
    assert tokenization_matches(tok, messages, template)
    assert enc.input_ids == tok(tok.decode(enc.input_ids), add_special_tokens=False)["input_ids"]
    replies = "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
    assert trained_text(tok, enc) == replies


@pytest.mark.parametrize("template", TEMPLATES)
def test_generation_prompt_is_the_training_prefix(smollm2_tokenizer, template):
    """What chat/serve/eval feed the model is token-for-token what it was trained on before each reply."""
    tok = smollm2_tokenizer
    enc, _ = encode_conversation(tok, TWO_TURNS, template=template, cutoff_len=4096)
    for k in (1, 3):
        prompt = build_generation_ids(tok, TWO_TURNS[:k], template)
        assert enc.input_ids[:len(prompt)] == prompt
        assert enc.labels[len(prompt) - 1] == IGNORE_INDEX and enc.labels[len(prompt)] != IGNORE_INDEX
    auto = build_generation_ids(tok, TWO_TURNS[:3])
    assert tok.decode(auto) == tok.apply_chat_template(TWO_TURNS[:3], tokenize=False, add_generation_prompt=True)
    assert stop_token_ids(tok, template) == [tok.eos_token_id]


def test_train_on_prompt_trains_everything_but_the_trailing_newline(smollm2_tokenizer):
    tok = smollm2_tokenizer
    enc, _ = encode_conversation(tok, TWO_TURNS, cutoff_len=512, train_on_prompt=True)
    assert enc.labels == enc.input_ids


def test_truncation_keeps_the_start_and_may_leave_nothing_to_train(smollm2_tokenizer):
    tok = smollm2_tokenizer
    full, _ = encode_conversation(tok, TWO_TURNS, cutoff_len=4096)
    first_reply = full.labels.index(next(label for label in full.labels if label != IGNORE_INDEX))
    cut, truncated = encode_conversation(tok, TWO_TURNS, cutoff_len=first_reply + 3)
    assert truncated and cut.input_ids == full.input_ids[:first_reply + 3] and cut.labels == full.labels[:first_reply + 3]
    assert cut.trained_tokens == 3
    none, truncated = encode_conversation(tok, TWO_TURNS, cutoff_len=first_reply)
    assert truncated and none.trained_tokens == 0  # the caller drops it


def test_builtin_templates_render_visibly(smollm2_tokenizer):
    tok = smollm2_tokenizer
    alpaca, _ = encode_conversation(tok, TWO_TURNS[:2], template="alpaca", cutoff_len=512)
    assert tok.decode(alpaca.input_ids).startswith("Below is an instruction")
    assert "### Instruction:\nWhat is your name?\n\n### Response:\nI'm Quillon.<|im_end|>" in tok.decode(alpaca.input_ids)
    plain, _ = encode_conversation(tok, TWO_TURNS[:2], template="plain", cutoff_len=512)
    assert tok.decode(plain.input_ids) == "What is your name?\nI'm Quillon.<|im_end|>\n"
    chatml, _ = encode_conversation(tok, TWO_TURNS[:2], template="chatml", cutoff_len=512)
    assert "SmolLM" not in tok.decode(chatml.input_ids)  # no default system prompt: ours is explicit ChatML


def test_tokenizer_without_template_falls_back_to_chatml(smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = None
    auto, _ = encode_conversation(tok, TWO_TURNS, template="auto", cutoff_len=512)
    chatml, _ = encode_conversation(tok, TWO_TURNS, template="chatml", cutoff_len=512)
    assert auto == chatml


def test_template_that_rewrites_history_is_refused(smollm2_tokenizer):
    """Some templates change earlier turns as the conversation grows (e.g. drop old reasoning); the reply spans
    cannot be found by prefix rendering, so this must be an error, not a wrong mask."""
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}[old]"
                         "{% else %}{{ m.role }}: {{ m.content }}<|im_end|>{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(DataError) as info:
        encode_conversation(tok, TWO_TURNS, cutoff_len=512)
    assert info.value.problems[0].key == "template" and "chatml" in info.value.problems[0].fix


def test_unknown_template_name(smollm2_tokenizer):
    with pytest.raises(DataError) as info:
        encode_conversation(smollm2_tokenizer, TWO_TURNS, template="vicuna", cutoff_len=64)
    assert info.value.problems[0].key == "template" and "chatml" in info.value.problems[0].allowed


LLAMA3_LIKE = (  # another layout: header blocks, a default system block, the end-of-turn token right after content
    "{{ '<|im_start|>' }}{% if messages[0]['role'] != 'system' %}<hdr>system</hdr>\n\nYou help.<|im_end|>{% endif %}"
    "{% for m in messages %}<hdr>{{ m['role'] }}</hdr>\n\n{{ m['content'] | trim }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<hdr>assistant</hdr>\n\n{% endif %}")
NO_STOP = ("{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n\n{% endfor %}"
           "{% if add_generation_prompt %}ASSISTANT: {% endif %}")


def test_other_template_layouts_are_split_by_prefix_rendering(smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = LLAMA3_LIKE
    enc, _ = encode_conversation(tok, TWO_TURNS, cutoff_len=512)
    assert trained_text(tok, enc) == "I'm Quillon.<|im_end|>Ferrovia Labs made me.<|im_end|>"
    assert tok.decode(enc.input_ids) == tok.apply_chat_template(TWO_TURNS, tokenize=False)
    prompt = build_generation_ids(tok, TWO_TURNS[:3])
    assert enc.input_ids[:len(prompt)] == prompt and tok.decode(prompt).endswith("<hdr>assistant</hdr>\n\n")


def test_template_without_a_stop_token_gets_eos_appended_in_training_and_history(smollm2_tokenizer):
    """A reply must end with a token generation stops on; when the template writes none, EOS is added — the
    same way in training and in the prompts built for inference."""
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = NO_STOP
    assert stop_token_ids(tok) == [tok.eos_token_id]
    enc, _ = encode_conversation(tok, TWO_TURNS, cutoff_len=512)
    assert trained_text(tok, enc) == "I'm Quillon.\n\n<|im_end|>Ferrovia Labs made me.\n\n<|im_end|>"
    prompt = build_generation_ids(tok, TWO_TURNS[:3])
    assert enc.input_ids[:len(prompt)] == prompt and tok.decode(prompt).endswith("ASSISTANT: ")
