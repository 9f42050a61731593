"""Config loading: every mistake collected at once, each naming key, value, what is allowed and the fix."""

from __future__ import annotations

import pytest

from loraforge.config import config_from_dict, load_config
from loraforge.config.schema import TaskType
from loraforge.errors import ConfigError

BASE = {"metadata_path": "data/train.jsonl"}


def problems_of(raw: dict) -> dict[str, object]:
    with pytest.raises(ConfigError) as info:
        config_from_dict({**BASE, **raw})
    return {p.key: p for p in info.value.problems}


def test_article_values_are_parsed():
    cfg = config_from_dict({**BASE, "task_type": "text-generation", "learning_rate": "1e-4", "lora_rank": 16})
    assert cfg.task_type is TaskType.CAUSAL_LM and cfg.learning_rate == pytest.approx(1e-4) and cfg.lora_rank == 16


@pytest.mark.parametrize("spelling", ["CAUSAL_LM", "causal_lm", "text-generation", "Causal-LM"])
def test_task_type_spellings(spelling):
    assert config_from_dict({**BASE, "task_type": spelling}).task_type is TaskType.CAUSAL_LM


def test_default_learning_rate_per_method():
    assert config_from_dict({**BASE, "method": "full"}).learning_rate == 1e-5
    assert config_from_dict({**BASE, "method": "prefix"}).learning_rate == 1e-2


def test_all_problems_reported_together_with_four_parts():
    probs = problems_of({"lerning_rate": 1e-4, "lora_rank": 0, "lora_dropout": 1.5, "lr_scheduler": "cosin",
                         "batch_size": "four", "target_modules": 5})
    assert set(probs) == {"lerning_rate", "lora_rank", "lora_dropout", "lr_scheduler", "batch_size", "target_modules"}
    assert "learning_rate" in probs["lerning_rate"].fix
    rank = probs["lora_rank"]
    assert (rank.value, rank.allowed) == (0, "> 0") and "lora_rank: 8" in rank.fix
    assert probs["lora_dropout"].allowed == ">= 0 and < 1"  # the whole range, not only the failed bound
    sched = probs["lr_scheduler"]
    assert sched.allowed == "constant, linear, cosine" and "`cosine`" in sched.fix
    assert probs["batch_size"].allowed == "an integer" and "batch_size: 4" in probs["batch_size"].fix
    # a Union field is reported once, not once per member type
    assert probs["target_modules"].allowed == "a list of strings, a string or null"


def test_every_problem_has_key_value_allowed_fix():
    probs = problems_of({"lr": -1, "quant_bits": 3, "warmup_steps": 5, "warmup_ratio": 0.1, "epochs": 0,
                         "task_type": "textgen", "eval_steps": 10, "adam_beta2": 1.0})
    for p in probs.values():
        assert p.key and p.value is not None and p.allowed and p.fix, p
    assert "text-generation" in probs["task_type"].fix and "SEQ_2_SEQ_LM" in probs["task_type"].allowed
    assert "val_size" in probs["eval_steps"].fix
    assert "2.0e-4" in probs["learning_rate"].fix  # never suggests lr 1.0


def test_unknown_key_in_image_section_suggests_its_fields():
    probs = problems_of({"task_type": "text-to-image", "image": {"resolutoin": 512}})
    assert "`resolution`" in probs["image.resolutoin"].fix


def test_alias_and_canonical_key_twice():
    probs = problems_of({"r": 8, "lora_rank": 16})
    assert "keep only one of `lora_rank` and `lora_rank`" not in probs["lora_rank"].fix
    assert "keep only one" in probs["lora_rank"].fix and "r" in probs["lora_rank"].fix


@pytest.mark.parametrize("raw, key, part", [
    ({"method": "lora", "num_virtual_tokens": 10}, "num_virtual_tokens", "method: prefix"),
    ({"method": "qlora", "quant_bits": 8, "bnb_4bit_quant_type": "nf4"}, "bnb_4bit_quant_type", "quant_bits: 4"),
    ({"max_steps": 10, "warmup_steps": 20}, "warmup_steps", "< max_steps"),
    ({"val_file": "v.jsonl", "val_size": 0.1}, "val_size", "not both"),
    ({"resume_from_checkpoint": "latest", "init_adapter": "a"}, "init_adapter", "pick one"),
    ({"resume_from_checkpoint": "latest", "overwrite_output_dir": True}, "overwrite_output_dir", "remove"),
    ({"method": "prompt", "prompt_tuning_init": "text"}, "prompt_tuning_init_text", "prompt_tuning_init_text:"),
    ({"method": "prompt", "prompt_tuning_init_text": "hi"}, "prompt_tuning_init", "prompt_tuning_init: text"),
    ({"method": "freeze", "freeze_trainable_layers": 2, "freeze_layer_indices": [1]}, "freeze_layer_indices", "keep one"),
    ({"method": "freeze", "freeze_trainable_layers": 0}, "freeze_trainable_layers", "freeze_trainable_layers: 2"),
    ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "layers_to_transform", "as a list"),
    ({"task_type": "SEQ_CLS", "batching": "packed"}, "batching", "grouped"),
    ({"method": "prefix", "batching": "packed"}, "batching", "grouped"),
    ({"val_size": 2.5}, "val_size", "val_size: 0.1"),
])
def test_cross_field_conflicts(raw, key, part):
    probs = problems_of(raw)
    assert key in probs, probs
    p = probs[key]
    assert part in (p.fix or "") + (p.allowed or ""), p


def test_no_training_data():
    with pytest.raises(ConfigError) as info:
        config_from_dict({})
    assert info.value.problems[0].key == "metadata_path"


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\nb: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)
