"""Meta-device module discovery and target_modules checks against the real module names of every family."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from loraforge.config.schema import TaskType
from loraforge.errors import ModelError
from loraforge.models.discovery import (PRESET_NAMES, check_target_modules, linear_modules, load_hf_config, meta_model,
                                        try_meta_model)
from loraforge.models.targets import PRESETS, default_target_modules, resolve_target_modules
from loraforge.models.registry import family_for, model_kind
from loraforge.models.tiny import TINY_FAMILIES, tiny_config, tiny_remote_config_dir

NATURAL_TASK = {"decoder-only": TaskType.CAUSAL_LM, "encoder-decoder": TaskType.SEQ_2_SEQ_LM,
                "encoder-only": TaskType.SEQ_CLS}


def built(family: str, task: TaskType | None = None):
    cfg = tiny_config(family, 1000)
    return cfg, meta_model(cfg, task or NATURAL_TASK[model_kind(cfg)])


def leaves(model) -> set[str]:
    return {i.leaf for i in linear_modules(model)}


# Measured with transformers 5.23 (FINDINGS.md "Module names").
MEASURED = {
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"},
    "gpt_neox": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "lm_head"},
    "bloom": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "lm_head"},
    "falcon": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "lm_head"},
    "gpt2": {"c_attn", "c_proj", "c_fc", "lm_head"},
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"},
    "glm": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"},
    "t5": {"q", "k", "v", "o", "wi", "wo", "lm_head"},
}


@pytest.mark.parametrize("family", sorted(MEASURED))
def test_linear_leaf_names_match_measurements(family):
    assert leaves(built(family)[1]) == MEASURED[family]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_family_qv_names_exist_in_the_built_model(family):
    cfg, model = built(family)
    fam = family_for(cfg)
    assert set(fam.qv_targets) <= leaves(model)
    assert set(resolve_target_modules(cfg, model, "qv")) == set(fam.qv_targets)
    assert check_target_modules(cfg, model, list(fam.qv_targets)) == []


# Left out, target_modules is every linear layer of the blocks (issue 14): fused layers included, no head.
DEFAULTS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "phi3": ["o_proj", "qkv_proj", "gate_up_proj", "down_proj"],
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "bert": ["query", "key", "value", "output.dense", "intermediate.dense"],  # `dense` alone would hit the pooler
}


@pytest.mark.parametrize("family", sorted(DEFAULTS))
def test_default_is_every_linear_layer_of_the_blocks(family):
    cfg, model = built(family)
    assert resolve_target_modules(cfg, model, None) == default_target_modules(cfg, model) == DEFAULTS[family]
    assert resolve_target_modules(cfg, model, "all") == DEFAULTS[family]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_peft_adapts_exactly_the_block_linears_by_default(family):
    """The resolved default makes PEFT adapt every linear layer with a layer index, and nothing else
    (no LM head, classifier or pooler), on a real (tiny, CPU) model of every family."""
    from peft import LoraConfig, get_peft_model

    cfg = tiny_config(family, 1000)
    task = NATURAL_TASK[model_kind(cfg)]
    import transformers

    from loraforge.models.loader import AUTO_CLASSES

    model = getattr(transformers, AUTO_CLASSES[task]).from_config(cfg)
    blocks = {i.name for i in linear_modules(model) if i.group != "head" and any(p.isdigit() for p in i.name.split("."))}
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=resolve_target_modules(cfg, model, None)))
    adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == blocks and blocks
    assert not any("lm_head" in n or "embed" in n for n in adapted)


def test_every_preset_name_is_documented():
    assert set(PRESETS) == set(PRESET_NAMES)


@pytest.mark.parametrize("family", ["llama", "gpt2", "falcon", "bert", "t5"])
def test_presets_split_attention_and_mlp(family):
    cfg, model = built(family)
    by_name = {i.name: i for i in linear_modules(model)}

    def hits(targets):
        return {n for n in by_name if any(n == t or n.endswith("." + t) for t in targets)}

    attention, mlp = (hits(resolve_target_modules(cfg, model, p)) for p in ("attention", "MLP"))
    assert attention and mlp and not attention & mlp
    assert {by_name[n].group for n in attention} == {"attention"} and {by_name[n].group for n in mlp} == {"mlp"}
    assert attention | mlp == hits(resolve_target_modules(cfg, model, None))
    assert hits(resolve_target_modules(cfg, model, "qv")) < attention
    assert check_target_modules(cfg, model, "attention") == []
    (p,) = check_target_modules(cfg, model, ["attention"])
    assert "preset" in p.message and "target_modules: attention" in p.fix


def test_shapes_classes_and_groups():
    by_name = {i.name: i for i in linear_modules(built("gpt2")[1])}
    c_attn = by_name["transformer.h.0.attn.c_attn"]
    assert (c_attn.cls_name, c_attn.in_features, c_attn.out_features, c_attn.group) == ("Conv1D", 32, 96, "attention")
    assert by_name["transformer.h.1.mlp.c_proj"].group == "mlp" and by_name["lm_head"].group == "head"
    falcon = {i.leaf: i for i in linear_modules(built("falcon")[1])}
    assert falcon["query_key_value"].cls_name == "FalconLinear"
    bert = {i.name: i for i in linear_modules(built("bert")[1])}
    assert bert["bert.encoder.layer.0.attention.output.dense"].group == "attention"
    assert bert["bert.encoder.layer.0.output.dense"].group == "mlp"
    assert bert["bert.encoder.layer.0.intermediate.dense"].group == "mlp"
    assert bert["classifier"].group == "head"
    assert by_name["transformer.h.0.attn.c_attn"].suffix == "attn.c_attn"


def test_linear_modules_of_a_peft_model_are_the_wrapped_layers():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("llama", 1000))
    before = [(i.leaf, i.in_features, i.out_features) for i in linear_modules(model)]
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    after = [(i.leaf, i.in_features, i.out_features) for i in linear_modules(peft_model)]
    assert after == before  # no lora_A / lora_B / base_layer entries


def test_bitsandbytes_linear_is_found():
    bnb = pytest.importorskip("bitsandbytes")
    model = torch.nn.Sequential()
    model.add_module("mlp", torch.nn.Module())
    model.mlp.add_module("up_proj", bnb.nn.Linear4bit(32, 64))
    (info,) = linear_modules(model)
    assert (info.name, info.cls_name, info.in_features, info.out_features, info.group) == \
        ("mlp.up_proj", "Linear4bit", 32, 64, "mlp")


# --------------------------------------------------------------------------------------------------- checks

def test_t5_names_on_llama_suggest_q_proj_v_proj():
    cfg, model = built("llama")
    p0, p1 = check_target_modules(cfg, model, ["q", "v"])
    assert (p0.key, p0.value, p1.key, p1.value) == ("target_modules[0]", "q", "target_modules[1]", "v")
    assert "`q_proj`" in p0.fix and "`v_proj`" in p1.fix and "[q_proj, v_proj]" in p0.fix
    assert set(p0.allowed.split(", ")) == MEASURED["llama"]


@pytest.mark.parametrize("family", ["gpt_neox", "bloom", "falcon"])
def test_split_names_on_fused_qkv_suggest_query_key_value(family):
    cfg, model = built(family)
    problems = check_target_modules(cfg, model, ["query_proj", "value_proj"])
    assert [p.key for p in problems] == ["target_modules[0]", "target_modules[1]"]
    assert all("`query_key_value`" in p.fix and "[query_key_value]" in p.fix for p in problems)
    assert "query_key_value" in problems[0].allowed


@pytest.mark.parametrize("family,wrong,right", [
    ("gpt2", "q_proj", "c_attn"), ("phi3", "v_proj", "qkv_proj"), ("t5", "q_proj", "q"), ("bert", "q_proj", "query"),
    ("distilbert", "query", "q_lin"), ("deberta-v2", "query", "query_proj"), ("llama", "W_pack", "q_proj"),
    ("llama", "wq", "q_proj"), ("bart", "q", "q_proj"), ("llama", "q_porj", "q_proj"), ("glm", "gate_proj", "gate_up_proj"),
])
def test_family_equivalents(family, wrong, right):
    cfg, model = built(family)
    (p,) = check_target_modules(cfg, model, [wrong])
    assert f"use `{right}`" in p.fix, p.fix


def test_fused_name_on_split_model_suggests_all_three():
    cfg, model = built("llama")
    (p,) = check_target_modules(cfg, model, ["query_key_value"])
    assert "[q_proj, k_proj, v_proj]" in p.fix


def test_every_name_must_match_although_peft_accepts_it():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama", 1000)
    model = AutoModelForCausalLM.from_config(cfg)
    (p,) = check_target_modules(cfg, model, ["q_proj", "query_key_value"])
    assert p.key == "target_modules[1]" and p.value == "query_key_value"
    # The trap this check exists for: PEFT silently adapts only q_proj (FINDINGS.md trap 3).
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "query_key_value"]))
    adapted = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj"}


def test_full_names_suffixes_and_embeddings_match():
    cfg, model = built("llama")
    assert check_target_modules(cfg, model, ["model.layers.0.self_attn.q_proj", "self_attn.v_proj", "embed_tokens"]) == []
    (p,) = check_target_modules(cfg, model, ["layers.9.self_attn.q_proj"])  # only 2 layers
    assert p.key == "target_modules[0]"


def test_containers_and_norms_are_not_adaptable():
    cfg, model = built("llama")
    p_attn, p_norm = check_target_modules(cfg, model, ["self_attn", "input_layernorm"])
    assert "not a layer LoRA can adapt" in p_attn.message and "q_proj, k_proj, v_proj, o_proj" in p_attn.fix
    assert "RMSNorm" in p_norm.message and "modules_to_save" in p_norm.fix


def test_regex_strings():
    cfg, model = built("llama")
    assert check_target_modules(cfg, model, r".*\.(q|v)_proj") == []
    (p,) = check_target_modules(cfg, model, r".*\.query")
    assert p.key == "target_modules" and "regex matches no module" in p.message
    (p,) = check_target_modules(cfg, model, "q_proj")  # a plain name as a string is a full-match regex in PEFT
    assert "[q_proj]" in p.fix and "FULL module name" in p.fix
    (p,) = check_target_modules(cfg, model, "(q_proj")
    assert "invalid" in p.message


def test_regex_inside_a_list_is_explained():
    cfg, model = built("llama")
    (p,) = check_target_modules(cfg, model, ["q_proj", r".*\.v_proj"])
    assert p.key == "target_modules[1]" and "not regular expressions" in p.message and "whole value" in p.fix


def test_all_linear_and_none():
    cfg, model = built("llama")
    assert check_target_modules(cfg, model, "all-linear") == []
    assert check_target_modules(cfg, model, "ALL-LINEAR") == []
    assert resolve_target_modules(cfg, model, "All-Linear") == "all-linear"
    assert check_target_modules(cfg, model, None) == []
    (p,) = check_target_modules(cfg, model, ["all-linear"])
    assert "whole value" in p.message
    (p,) = check_target_modules(cfg, model, [])
    assert "empty" in p.message
    (p,) = check_target_modules(cfg, model, ["q_proj", 3])
    assert p.key == "target_modules[1]"


def test_resolve_raises_model_error_with_every_problem():
    cfg, model = built("llama")
    with pytest.raises(ModelError) as info:
        resolve_target_modules(cfg, model, ["q", "v", "o_proj"])
    assert [p.key for p in info.value.problems] == ["target_modules[0]", "target_modules[1]"]


# --------------------------------------------------------------------------------------- remote-code fallback

@pytest.mark.parametrize("family,wrong,right", [
    ("chatglm", ["query_proj", "value_proj"], "query_key_value"), ("baichuan", ["q_proj"], "W_pack"),
    ("qwen", ["q_proj"], "c_attn"),
])
def test_remote_code_family_falls_back_to_registry_names(tmp_path, family, wrong, right):
    cfg = load_hf_config(tiny_remote_config_dir(family, tmp_path))
    assert try_meta_model(cfg) is None
    with pytest.raises(ModelError) as info:
        meta_model(cfg)
    assert info.value.problems[0].key == "trust_remote_code"
    problems = check_target_modules(cfg, None, wrong)
    assert len(problems) == len(wrong)
    assert all(f"`{right}`" in p.fix and "registry" in p.message for p in problems)
    fam = family_for(cfg)
    assert check_target_modules(cfg, None, list(fam.qv_targets)) == []
    assert resolve_target_modules(cfg, None, "qv") == list(fam.qv_targets)
    default = resolve_target_modules(cfg, None, None)
    assert right in default and "lm_head" not in default and "output_layer" not in default
    assert len(default) > 1 and set(default) < set(fam.remote_code_modules)


def test_remote_config_with_trust_but_no_code(tmp_path):
    cfg = load_hf_config(tiny_remote_config_dir("chatglm", tmp_path), trust_remote_code=True)
    with pytest.raises(ModelError) as info:
        meta_model(cfg, trust_remote_code=True)
    assert "4.42" in info.value.problems[0].message


def test_unknown_model_type_is_a_model_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "lama", "hidden_size": 8}')
    with pytest.raises(ModelError) as info:
        load_hf_config(tmp_path)
    assert "llama" in info.value.problems[0].fix


# ------------------------------------------------------------------------------------------------ big configs

def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_7b_config_builds_on_meta_without_memory():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      vocab_size=32000)
    rss = _rss_mb()
    start = time.perf_counter()
    model = meta_model(cfg)
    elapsed = time.perf_counter() - start
    assert elapsed < 10
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616
    assert _rss_mb() - rss < 500  # 27 GB in fp32 if it were materialized
    layers = linear_modules(model)
    assert len(layers) == 32 * 7 + 1
    assert check_target_modules(cfg, model, ["q_proj", "v_proj"]) == []
