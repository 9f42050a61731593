"""Model kind and task_type checks from the config alone (no model is built, no weights read)."""

from __future__ import annotations

import pytest

from loraforge.config.schema import TaskType
from loraforge.errors import ModelError
from loraforge.models.registry import (FAMILIES, allowed_task_types, check_task_type, family_for, model_kind,
                                       supported_task_types)
from loraforge.models.tiny import TINY_FAMILIES, TINY_REMOTE_FAMILIES, _REMOTE_CONFIGS, tiny_config

KINDS = {
    "llama": "decoder-only", "mistral": "decoder-only", "qwen2": "decoder-only", "qwen3": "decoder-only",
    "gemma": "decoder-only", "gemma2": "decoder-only", "phi": "decoder-only", "phi3": "decoder-only",
    "glm": "decoder-only", "glm4": "decoder-only", "gpt2": "decoder-only", "gpt_neox": "decoder-only",
    "bloom": "decoder-only", "falcon": "decoder-only", "opt": "decoder-only",
    "t5": "encoder-decoder", "mt5": "encoder-decoder", "bart": "encoder-decoder", "mbart": "encoder-decoder",
    "bert": "encoder-only", "roberta": "encoder-only", "distilbert": "encoder-only", "deberta-v2": "encoder-only",
}


def test_every_tiny_family_has_an_expected_kind():
    assert set(KINDS) == set(TINY_FAMILIES)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_kind_and_family_from_config(family):
    cfg = tiny_config(family, 1000)
    assert model_kind(cfg) == KINDS[family]
    fam = family_for(cfg)
    assert fam is not None and fam.kind == KINDS[family] and cfg.model_type in fam.model_types


@pytest.mark.parametrize("family", TINY_REMOTE_FAMILIES)
def test_remote_code_families_are_decoder_only(family):
    raw = _REMOTE_CONFIGS[family]
    assert family_for(raw).name == family and model_kind(raw) == "decoder-only"


def test_family_by_architecture_when_model_type_is_unusual():
    # Some re-uploads of Baichuan / ChatGLM change model_type but keep the architecture name.
    assert family_for({"model_type": "baichuan2", "architectures": ["BaichuanForCausalLM"]}).name == "baichuan"
    assert family_for({"model_type": "glm-x", "architectures": ["ChatGLMModel"]}).name == "chatglm"
    assert family_for({"model_type": "nothing-known"}) is None


def test_registry_names_the_required_families_and_fused_qkv():
    by_name = {f.name: f for f in FAMILIES}
    for name in ("llama", "mistral", "qwen", "qwen2", "qwen3", "chatglm", "glm", "baichuan", "gpt2", "gpt_neox",
                 "bloom", "falcon", "phi", "phi3", "gemma", "t5", "bart", "bert"):
        assert name in by_name
    assert by_name["chatglm"].qv_targets == ("query_key_value",) and by_name["chatglm"].needs_remote_code
    assert by_name["baichuan"].fused_qkv == ("W_pack",)
    assert by_name["qwen"].qv_targets == ("c_attn",)
    assert by_name["glm"].qv_targets == ("q_proj", "v_proj") and not by_name["glm"].needs_remote_code
    assert by_name["t5"].qv_targets == ("q", "v") and by_name["bert"].qv_targets == ("query", "value")


def test_allowed_task_types_per_kind():
    assert TaskType.CAUSAL_LM in allowed_task_types("decoder-only")
    assert TaskType.SEQ_2_SEQ_LM not in allowed_task_types("decoder-only")
    assert TaskType.SEQ_2_SEQ_LM in allowed_task_types("encoder-decoder")
    assert TaskType.CAUSAL_LM not in allowed_task_types("encoder-decoder")
    assert set(allowed_task_types("encoder-only")) == {TaskType.SEQ_CLS, TaskType.TOKEN_CLS,
                                                      TaskType.QUESTION_ANSWERING, TaskType.FEATURE_EXTRACTION}


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "glm", "gpt2", "falcon"])
def test_seq2seq_on_decoder_only_names_causal_lm(family):
    (p,) = check_task_type(tiny_config(family, 1000), TaskType.SEQ_2_SEQ_LM)
    assert p.key == "task_type" and p.value == "SEQ_2_SEQ_LM"
    assert "decoder-only" in p.message and "CAUSAL_LM" in p.fix and "SEQ_2_SEQ_LM" not in p.allowed


def test_seq2seq_on_chatglm_explains_its_misleading_auto_map():
    # ChatGLM's remote code registers AutoModelForSeq2SeqLM: the article's trap.
    (p,) = check_task_type(_REMOTE_CONFIGS["chatglm"], TaskType.SEQ_2_SEQ_LM)
    assert "AutoModelForSeq2SeqLM" in p.message and "CAUSAL_LM" in p.fix
    assert check_task_type(_REMOTE_CONFIGS["chatglm"], TaskType.CAUSAL_LM) == []


@pytest.mark.parametrize("family", ["t5", "mt5", "bart", "mbart"])
def test_causal_lm_on_encoder_decoder_names_seq2seq(family):
    # BART even has a BartForCausalLM in transformers (its decoder alone); training it would drop the encoder.
    (p,) = check_task_type(tiny_config(family, 1000), TaskType.CAUSAL_LM)
    assert p.key == "task_type" and "encoder-decoder" in p.message and "SEQ_2_SEQ_LM" in p.fix


def test_generation_on_encoder_only_is_refused():
    for task in (TaskType.CAUSAL_LM, TaskType.SEQ_2_SEQ_LM):
        (p,) = check_task_type(tiny_config("bert", 1000), task)
        assert "encoder-only" in p.message and "decoder-only" in p.fix and "SEQ_CLS" in p.allowed


def test_task_without_an_auto_class_is_refused():
    (p,) = check_task_type(tiny_config("gemma", 1000), TaskType.QUESTION_ANSWERING)
    assert "AutoModelForQuestionAnswering" in p.message and "QUESTION_ANSWERING" not in p.allowed
    (p,) = check_task_type(tiny_config("bart", 1000), TaskType.TOKEN_CLS)
    assert "AutoModelForTokenClassification" in p.message
    assert check_task_type(tiny_config("t5", 1000), TaskType.TOKEN_CLS) == []  # T5ForTokenClassification exists
    (p,) = check_task_type(_REMOTE_CONFIGS["qwen"], TaskType.SEQ_CLS)
    assert "auto_map" in p.message


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_supported_task_type_passes(family):
    cfg = tiny_config(family, 1000)
    supported = supported_task_types(cfg)
    assert supported
    for task in TaskType:
        assert (check_task_type(cfg, task) == []) == (task in supported)


def test_text_to_image_on_a_text_model():
    (p,) = check_task_type(tiny_config("llama", 1000), TaskType.TEXT_TO_IMAGE)
    assert "Stable Diffusion" in p.message


def test_kind_of_a_non_text_model_is_an_error():
    with pytest.raises(ModelError) as info:
        model_kind({"model_type": "siglip_vision_model"})
    assert info.value.problems[0].key == "base_model"
