"""`loraforge inspect`: facts about a model from its config alone."""

from __future__ import annotations

import json
import time

import pytest

from loraforge.errors import ModelError
from loraforge.models.inspect import format_inspect, inspect_model
from loraforge.models.tiny import tiny_config, tiny_remote_config_dir


def test_smollm2_by_builtin_name(smollm2_dir):
    report = inspect_model("smollm2")
    assert report.model_dir == smollm2_dir and report.weights_present
    assert (report.architecture, report.model_type, report.family, report.kind) == \
        ("LlamaForCausalLM", "llama", "llama", "decoder-only")
    assert report.task_types[0] == "CAUSAL_LM" and "SEQ_2_SEQ_LM" not in report.task_types
    assert report.total_params == 134_515_008  # tied embeddings counted once
    groups = {(g.group, g.suffix): g for g in report.groups}
    q = groups[("attention", "self_attn.q_proj")]
    assert (q.in_features, q.out_features, q.count, q.cls_name) == (576, 576, 30, "Linear")
    k = groups[("attention", "self_attn.k_proj")]
    assert (k.out_features, k.count) == (192, 30)  # grouped-query attention: 3 KV heads of 64
    assert groups[("mlp", "mlp.down_proj")].in_features == 1536
    assert groups[("head", "lm_head")].count == 1
    assert report.default_targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    attention, mlp = (576 + 576) + 2 * (576 + 192) + (576 + 576), 2 * (576 + 1536) + (1536 + 576)
    assert report.lora_params == 30 * 8 * (attention + mlp)
    assert "lm_head" not in report.all_linear and "gate_proj" in report.all_linear

    text = format_inspect(report)
    for part in ("LlamaForCausalLM", "decoder-only", "CAUSAL_LM, SEQ_CLS", "134,515,008", "attention", "mlp",
                 "self_attn.q_proj", "576 -> 576", "x30", "default target_modules  [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]", "all-linear"):
        assert part in text, part


def test_config_only_7b_is_instant(tmp_path):
    cfg = tiny_config("llama", 32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(tmp_path)
    start = time.perf_counter()
    report = inspect_model(tmp_path)
    assert time.perf_counter() - start < 10
    assert not report.weights_present and report.total_params == 6_738_415_616
    text = format_inspect(report)
    assert "6.7B" in text and "no weights" in text and "x32" in text and "4096 -> 11008" in text


def test_encoder_decoder_and_encoder_only(tmp_path):
    tiny_config("t5", 1000).save_pretrained(tmp_path / "t5")
    t5 = inspect_model(tmp_path / "t5")
    assert t5.kind == "encoder-decoder" and t5.built_for == "SEQ_2_SEQ_LM" and t5.default_targets == ["q", "k", "v", "o", "wi", "wo"]
    assert {g.suffix for g in t5.groups if g.group == "attention"} >= {"SelfAttention.q", "EncDecAttention.q"}
    assert "CAUSAL_LM" not in t5.task_types
    tiny_config("bert", 1000).save_pretrained(tmp_path / "bert")
    bert = inspect_model(tmp_path / "bert")
    assert bert.kind == "encoder-only" and bert.default_targets == ["query", "key", "value", "output.dense", "intermediate.dense"]
    assert {g.suffix for g in bert.groups if g.group == "mlp"} == {"intermediate.dense", "output.dense"}


def test_gpt2_conv1d_shapes_and_note(tmp_path):
    tiny_config("gpt2", 1000).save_pretrained(tmp_path)
    report = inspect_model(tmp_path)
    c_attn = next(g for g in report.groups if g.leaf == "c_attn")
    assert (c_attn.cls_name, c_attn.in_features, c_attn.out_features, c_attn.count) == ("Conv1D", 32, 96, 2)
    assert "fan_in_fan_out" in format_inspect(report)


def test_remote_code_model_uses_the_registry(tmp_path):
    report = inspect_model(tiny_remote_config_dir("chatglm", tmp_path))
    assert report.family == "chatglm" and report.kind == "decoder-only" and report.total_params is None
    assert report.registry_modules[0] == "query_key_value" and report.default_targets == ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    text = format_inspect(report)
    assert "registry" in text and "query_key_value" in text and "SEQ_2_SEQ_LM" not in text


def test_unknown_model(tmp_path):
    with pytest.raises(ModelError) as info:
        inspect_model(tmp_path / "missing")
    assert info.value.problems[0].key == "base_model"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen_2", "hidden_size": 8}))
    with pytest.raises(ModelError) as info:
        inspect_model(tmp_path)
    assert "qwen2" in info.value.problems[0].fix
