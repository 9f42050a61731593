"""Prompt tuning, P-tuning and prefix tuning details beyond the shared contract: initialization, encoder
variants, the native (ChatGLM-style) P-tuning v2 path, and the root cause of FINDINGS trap 5."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from loraforge.config import TaskType, config_from_dict  # noqa: E402
from loraforge.errors import ModelError  # noqa: E402
from loraforge.methods import prefix, prompt, ptuning  # noqa: E402
from loraforge.methods.common import peft_task_type  # noqa: E402
from loraforge.methods import verify_trainable  # noqa: E402
from loraforge.methods.report import trainable_report  # noqa: E402


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from loraforge.models.tiny import tiny_model_dir

    return tiny_model_dir("llama", tmp_path_factory.mktemp("tiny"))


def _cfg(method, **kw):
    return config_from_dict({"method": method, "metadata_path": "unused.jsonl", "num_virtual_tokens": 6, **kw})


def _load(path):
    from loraforge.models.loader import load_model

    return load_model(path, TaskType.CAUSAL_LM, dtype="float32")


def test_text_init_copies_the_texts_token_embeddings(llama_dir):
    from transformers import AutoTokenizer

    text = "Classify the mood:"
    model = _load(llama_dir)
    words = model.get_input_embeddings().weight.detach().clone()
    peft_model = prompt.apply(model, cfg := _cfg("prompt", prompt_tuning_init="text", prompt_tuning_init_text=text))
    assert not verify_trainable(trainable_report(peft_model), cfg)
    ids = AutoTokenizer.from_pretrained(llama_dir)(text, add_special_tokens=False)["input_ids"]
    ids = (ids * 6)[:6]  # PEFT repeats the text's tokens up to num_virtual_tokens
    virtual = peft_model.get_prompt_embedding_to_save("default")
    assert torch.equal(virtual, words[ids])


def test_random_init_differs_from_text_init(llama_dir):
    a = prompt.apply(_load(llama_dir), _cfg("prompt")).get_prompt_embedding_to_save("default")
    assert a.shape == (6, 32)


@pytest.mark.parametrize(("kind", "module"), [("MLP", "mlp_head"), ("LSTM", "lstm_head")])
def test_ptuning_encoder_types(llama_dir, kind, module):
    model = ptuning.apply(_load(llama_dir), cfg := _cfg("ptuning", encoder_reparameterization_type=kind,
                                                         encoder_hidden_size=16))
    names = trainable_report(model).trainable_names
    assert any(f"prompt_encoder.default.{module}" in n for n in names)
    assert all("prompt_encoder" in n for n in names)
    assert not verify_trainable(trainable_report(model), cfg)


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_projection_adds_the_mlp(llama_dir, projection):
    model = prefix.apply(_load(llama_dir), _cfg("prefix", prefix_projection=projection, encoder_hidden_size=8))
    names = trainable_report(model).trainable_names
    assert any(".transform." in n for n in names) == projection
    emb = model.prompt_encoder["default"].embedding.weight
    # without projection: the key/value vectors themselves, one row per virtual token for all layers
    # (2 layers × keys and values × 2 kv-heads × head dim 8); with it: a smaller input to the MLP
    assert emb.shape == ((6, 16) if projection else (6, 2 * 2 * 2 * 8))


def test_prefix_generation_uses_the_cache(llama_dir):
    """FINDINGS trap 6: cached generation works for prefix tuning (the no-cache path crashes in transformers 5)."""
    model = prefix.apply(_load(llama_dir), _cfg("prefix")).eval()
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False, use_cache=True)
    assert out.shape[1] == 6


def test_left_padding_changes_prompt_learning_outputs_because_positions_shift(llama_dir):
    """FINDINGS trap 5, root cause: PEFT drops `position_ids` for prompt learning, so a left-padded row's real
    tokens sit further from the virtual tokens than when the row is alone. Feeding the same embeddings with
    mask-derived position ids makes the padded row exact — loraforge therefore never left-pads prompt-learning
    generation (one row at a time, or equal-length rows)."""
    model = prompt.apply(_load(llama_dir), _cfg("prompt")).eval()
    for p in model.prompt_encoder.parameters():  # a visible prompt, as after training
        torch.nn.init.normal_(p, std=1.0)
    base = model.get_base_model()
    short = [5, 9, 14]
    pad = 5
    ids = torch.tensor([[2] * pad + short])
    mask = torch.tensor([[0] * pad + [1] * len(short)])
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([short])).logits[0, -1]
        padded = model(input_ids=ids, attention_mask=mask).logits[0, -1]
        virtual = model.get_prompt(batch_size=1)
        embeds = torch.cat([virtual, base.get_input_embeddings()(ids)], dim=1)
        full_mask = torch.cat([torch.ones(1, 6, dtype=torch.long), mask], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp_min(0)
        fixed = base(inputs_embeds=embeds, attention_mask=full_mask, position_ids=positions).logits[0, -1]
    assert (padded - alone).abs().max() > 1e-4
    torch.testing.assert_close(fixed, alone, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- native P-tuning v2


def _native_classes():
    """A minimal model that implements P-tuning v2 itself, the way ChatGLM2/3 do: `config.pre_seq_len` makes it
    build a `prefix_encoder` (an embedding, or embedding + MLP with `prefix_projection`)."""
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedModel

    class NativeConfig(PretrainedConfig):
        model_type = "native-prefix-test"

        def __init__(self, hidden_size=16, pre_seq_len=None, prefix_projection=False, **kw):
            self.hidden_size, self.pre_seq_len, self.prefix_projection = hidden_size, pre_seq_len, prefix_projection
            super().__init__(**kw)

    class PrefixEncoder(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.embedding = nn.Embedding(config.pre_seq_len, config.hidden_size)
            self.trans = nn.Linear(config.hidden_size, config.hidden_size) if config.prefix_projection else None

    class NativeModel(PreTrainedModel):
        config_class = NativeConfig

        def __init__(self, config):
            super().__init__(config)
            self.embed = nn.Embedding(32, config.hidden_size)
            self.layer = nn.Linear(config.hidden_size, config.hidden_size)
            if config.pre_seq_len is not None:
                self.prefix_encoder = PrefixEncoder(config)
            self.post_init()

    return NativeConfig, NativeModel


def test_native_prefix_uses_the_models_own_prefix_encoder(tmp_path):
    config_cls, model_cls = _native_classes()
    model_cls(config_cls()).save_pretrained(tmp_path)
    hf_config = config_cls.from_pretrained(tmp_path)
    cfg = _cfg("prefix", num_virtual_tokens=4, prefix_projection=True)
    assert prefix.uses_native_prefix(hf_config) and prefix.check(cfg, hf_config) == []
    kwargs = prefix.load_kwargs(cfg, hf_config)
    assert kwargs == {"pre_seq_len": 4, "prefix_projection": True}
    model = prefix.apply(model_cls.from_pretrained(tmp_path, **kwargs), cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prefix_encoder.embedding.weight", "prefix_encoder.trans.weight", "prefix_encoder.trans.bias"}
    assert not verify_trainable(trainable_report(model), cfg)
    # loaded without the loader kwargs: no prefix encoder was built, and apply says how to fix it
    with pytest.raises(ModelError, match="load_kwargs"):
        prefix.apply(model_cls.from_pretrained(tmp_path), cfg)


def test_peft_task_name_for_question_answering():
    from peft import TaskType as PeftTaskType

    assert peft_task_type(TaskType.QUESTION_ANSWERING) is PeftTaskType.QUESTION_ANS
    assert peft_task_type(TaskType.SEQ_CLS) is PeftTaskType.SEQ_CLS


def test_prefix_on_multi_query_falcon_is_refused():
    """Measured: PEFT's prefix has one key/value head per attention head, falcon-7b-style models have one."""
    from loraforge.models.tiny import tiny_config

    cfg = _cfg("prefix")
    problems = prefix.check(cfg, tiny_config("falcon", 64, multi_query=True))
    assert [p.key for p in problems] == ["method"] and "Falcon" in problems[0].message
    assert prefix.check(cfg, tiny_config("falcon", 64, multi_query=False)) == []
    assert prefix.check(cfg, tiny_config("falcon", 64, new_decoder_architecture=True, num_kv_heads=2)) == []
    assert ptuning.check(_cfg("ptuning"), tiny_config("falcon", 64, multi_query=True)) == []
