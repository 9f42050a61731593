"""Freeze tuning: exactly the chosen blocks / modules / embeddings / head train, errors name key and range."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from loraforge.config import TaskType, config_from_dict  # noqa: E402
from loraforge.errors import ConfigError  # noqa: E402
from loraforge.methods import freeze  # noqa: E402
from loraforge.methods import verify_trainable  # noqa: E402
from loraforge.methods.report import trainable_report  # noqa: E402


def _cfg(**kw):
    return config_from_dict({"method": "freeze", "metadata_path": "unused.jsonl", **kw})


def _model(family="llama", task_type=TaskType.CAUSAL_LM, layers=4, **kw):
    import transformers

    from loraforge.models.loader import AUTO_CLASSES
    from loraforge.models.tiny import tiny_config

    overrides = {"num_layers": layers, "num_decoder_layers": layers} if family == "t5" else {"num_hidden_layers": layers}
    if family == "gpt2":
        overrides = {"n_layer": layers}
    config = tiny_config(family, 64, **overrides, **kw)
    torch.manual_seed(0)
    return getattr(transformers, AUTO_CLASSES[task_type]).from_config(config)


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _blocks(names: set[str], stack: str) -> set[int]:
    return {int(n[len(stack) + 1:].split(".")[0]) for n in names if n.startswith(stack + ".")}


def test_default_trains_the_last_two_blocks_only():
    model = freeze.apply(_model(), cfg := _cfg())
    names = _trainable(model)
    assert _blocks(names, "model.layers") == {2, 3}
    assert all(n.startswith(("model.layers.2.", "model.layers.3.")) for n in names)
    assert not verify_trainable(trainable_report(model), cfg)


@pytest.mark.parametrize(("kw", "want"), [
    ({"freeze_trainable_layers": 1}, {3}),
    ({"freeze_trainable_layers": -2}, {0, 1}),
    ({"freeze_layer_indices": [0, -1]}, {0, 3}),
])
def test_block_choices(kw, want):
    assert _blocks(_trainable(freeze.apply(_model(), _cfg(**kw))), "model.layers") == want


def test_modules_regex_alone_and_within_blocks():
    alone = _trainable(freeze.apply(_model(), _cfg(freeze_trainable_modules=[r"mlp\.down_proj"])))
    assert alone == {f"model.layers.{i}.mlp.down_proj.weight" for i in range(4)}
    within = _trainable(freeze.apply(_model(), _cfg(freeze_trainable_layers=1, freeze_trainable_modules=["mlp"])))
    assert within == {f"model.layers.3.mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")}


def test_out_of_range_index_names_key_value_and_range():
    with pytest.raises(ConfigError) as err:
        freeze.apply(_model(), _cfg(freeze_layer_indices=[1, 7]))
    p = err.value.problems[0]
    assert p.key == "freeze_layer_indices" and p.value == [1, 7] and p.allowed == "-4 … 3"
    with pytest.raises(ConfigError) as err:
        freeze.apply(_model(), _cfg(freeze_trainable_layers=9))
    assert err.value.problems[0].key == "freeze_trainable_layers" and "4 blocks" in err.value.problems[0].message


def test_regex_matching_nothing_is_an_error():
    with pytest.raises(ConfigError, match="no parameter name matches"):
        freeze.apply(_model(), _cfg(freeze_trainable_modules=["q_porj"]))


def test_tied_lm_head_trains_the_embeddings_and_says_so(caplog):
    model = _model(tie_word_embeddings=True)
    assert freeze.tied_embeddings(model)
    with caplog.at_level("WARNING", logger="loraforge.methods.freeze"):
        freeze.apply(model, cfg := _cfg(freeze_train_lm_head=True))
    assert model.get_input_embeddings().weight.requires_grad
    assert "trains both" in caplog.text
    assert "model.embed_tokens.weight" in _trainable(model)
    assert not verify_trainable(trainable_report(model), cfg)


def test_untied_embeddings_and_head_are_separate():
    model = freeze.apply(_model(tie_word_embeddings=False), _cfg(freeze_train_embeddings=True))
    assert model.get_input_embeddings().weight.requires_grad
    assert not model.get_output_embeddings().weight.requires_grad


def test_classification_head_always_trains():
    model = freeze.apply(_model(task_type=TaskType.SEQ_CLS, num_labels=3), _cfg(task_type="SEQ_CLS"))
    assert {"score.weight"} <= _trainable(model)


@pytest.mark.parametrize(("family", "stacks"), [
    ("gpt2", ["transformer.h"]),
    ("t5", ["encoder.block", "decoder.block"]),
    ("bert", ["encoder.layer"]),
])
def test_block_lists_found_generically(family, stacks):
    task = TaskType.SEQ_2_SEQ_LM if family == "t5" else TaskType.FEATURE_EXTRACTION if family == "bert" \
        else TaskType.CAUSAL_LM
    model = _model(family, task)
    assert [s.name for s in freeze.block_stacks(model)] == stacks
    names = _trainable(freeze.apply(model, _cfg(freeze_trainable_layers=1)))
    for stack in stacks:
        assert _blocks(names, stack) == {3}


def test_preflight_check_from_config_alone():
    from loraforge.models.tiny import tiny_config

    hf_config = tiny_config("llama", 64, num_hidden_layers=4)
    assert freeze.check(_cfg(freeze_trainable_layers=2), hf_config) == []
    problems = freeze.check(_cfg(freeze_layer_indices=[4], freeze_trainable_modules=["mlp("]), hf_config)
    assert [p.key for p in problems] == ["freeze_trainable_modules[0]", "freeze_layer_indices"]
    assert freeze.check(_cfg(freeze_trainable_layers=3), tiny_config("t5", 64, num_layers=4, num_decoder_layers=2))


def test_verify_catches_embeddings_that_train_without_being_asked():
    model = freeze.apply(_model(tie_word_embeddings=False), cfg := _cfg())
    model.get_input_embeddings().weight.requires_grad_(True)
    problems = verify_trainable(trainable_report(model), cfg)
    assert [p.key for p in problems] == ["freeze_train_embeddings"]
