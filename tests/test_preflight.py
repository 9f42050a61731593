"""run_preflight in process: the data summary, method hooks, and the trainable-parameter verification that makes
training refuse to start when the built model disagrees with the config (issue 3, point 8)."""

from __future__ import annotations

import json
import shutil

import pytest

from loraforge.config import config_from_dict
from loraforge.errors import ConfigError, LoraforgeError
from loraforge.preflight import PreflightError, run_preflight
from test_train_helpers import build


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from loraforge.models.tiny import tiny_model_dir

    return tiny_model_dir("llama", tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def weightless_llama(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("weightless") / "llama"
    shutil.copytree(tiny_llama, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return out


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """10 rows; rows 8 and 9 are much longer than cutoff_len 64."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"instruction": f"What is {i} plus {i}?", "output": f"It is {2 * i}."} for i in range(8)]
    rows += [{"instruction": "Tell a long story.", "output": "once upon a time " * 60} for _ in range(2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg_of(model, data, **kw):
    return config_from_dict({"base_model": str(model), "metadata_path": str(data), "cutoff_len": 64,
                             "tokenized_cache": False, "output_dir": str(data.parent / "run"), **kw})


def test_summary_counts_examples_percentiles_and_overlong(weightless_llama, data_file):
    lines: list[str] = []
    report = run_preflight(cfg_of(weightless_llama, data_file, target_modules=["q_proj", "v_proj"]), echo=lines.append)
    text = "\n".join(lines)
    assert "preflight OK: llama (decoder-only), task CAUSAL_LM, method lora, target_modules ['q_proj', 'v_proj']" in text
    assert "batching packed" in text
    assert "data: 10 training examples" in text and "tokens per example: p50" in text
    assert "longer than cutoff_len: 2 (overlong: truncate); truncated 2, dropped 0" in text
    assert report.data_stats.p90 > 64 and report.data_stats.examples == 10
    assert "no weight files" in text  # validated without any weights


def test_overlong_drop_is_counted(weightless_llama, data_file):
    lines: list[str] = []
    run_preflight(cfg_of(weightless_llama, data_file, overlong="drop"), echo=lines.append)
    text = "\n".join(lines)
    assert "data: 8 training examples" in text and "dropped 2" in text


def test_default_targets_are_every_linear_layer_of_the_blocks(weightless_llama, data_file):
    lines: list[str] = []
    report = run_preflight(cfg_of(weightless_llama, data_file), echo=lines.append)
    assert report.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert "target_modules ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']" in lines[0]
    assert not any("advice" in line for line in lines)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "attention", r".*\.(q|k|v|o)_proj"])
def test_attention_only_targets_get_one_advisory_line(weightless_llama, data_file, targets):
    lines: list[str] = []
    run_preflight(cfg_of(weightless_llama, data_file, target_modules=targets), echo=lines.append)
    (advice,) = [line for line in "\n".join(lines).splitlines() if "attention layers only" in line]
    assert advice.startswith("advice: ") and "Leave target_modules out" in advice


@pytest.mark.parametrize("targets", [["q_proj", "down_proj"], "all-linear", "mlp", "all"])
def test_targets_with_mlp_layers_get_no_advice(weightless_llama, data_file, targets):
    lines: list[str] = []
    run_preflight(cfg_of(weightless_llama, data_file, target_modules=targets), echo=lines.append)
    assert not any("advice" in line for line in lines)


def test_method_check_hook_runs(weightless_llama, data_file):
    """prompt tuning defines `check(cfg, hf_config)`: its refusal of SEQ_CLS on a decoder-only model shows up."""
    with pytest.raises(PreflightError) as info:
        run_preflight(cfg_of(weightless_llama, data_file, method="prompt", task_type="SEQ_CLS"), echo=lambda _m: None)
    assert any(p.key == "method" and "pools a padding position" in p.message for p in info.value.problems)


def test_model_and_data_problems_are_reported_together(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q"}\n')
    with pytest.raises(PreflightError) as info:
        run_preflight(config_from_dict({"base_model": str(tmp_path / "nope"), "metadata_path": str(bad)}),
                      echo=lambda _m: None)
    keys = [p.key for p in info.value.problems]
    assert "base_model" in keys and f"{bad}:1" in keys


# ------------------------------------------------------------------------- trainable parameters are verified

def test_freeze_flag_parsed_but_never_applied_refuses_to_train(tiny_llama, data_file, monkeypatch):
    """The known failure elsewhere: `freeze` parsed but not applied, so every layer trains. Simulated by a method
    that returns the model untouched; the trainer must refuse."""
    import loraforge.methods as methods

    monkeypatch.setattr(methods, "apply_method", lambda model, cfg: model)
    with pytest.raises(ConfigError) as info:
        build(cfg_of(tiny_llama, data_file, method="freeze", freeze_trainable_layers=1), tiny_llama)
    assert "nothing was frozen" in info.value.format()


def test_lora_method_that_created_no_lora_weights_refuses(tiny_llama, data_file, monkeypatch):
    import loraforge.methods as methods

    def freeze_all(model, cfg):
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    monkeypatch.setattr(methods, "apply_method", freeze_all)
    with pytest.raises(ConfigError, match="nothing is trainable"):
        build(cfg_of(tiny_llama, data_file), tiny_llama)


def test_lora_list_entry_peft_ignored_is_caught_on_the_built_model(tiny_llama, data_file):
    """PEFT adapts only q_proj for [q_proj, query_key_value] on LLaMA (FINDINGS trap 3); the built model shows it."""
    from peft import LoraConfig, get_peft_model

    from loraforge.methods import verify_trainable
    from loraforge.methods.report import trainable_report
    from loraforge.models.loader import load_model

    cfg = cfg_of(tiny_llama, data_file, target_modules=["q_proj", "query_key_value"])
    model = get_peft_model(load_model(tiny_llama, cfg.task_type), LoraConfig(target_modules=["q_proj", "query_key_value"]))
    problems = verify_trainable(trainable_report(model), cfg)
    assert [(p.key, p.value) for p in problems] == [("target_modules[1]", "query_key_value")]


def test_full_finetune_with_frozen_parameters_refuses(tiny_llama, data_file, monkeypatch):
    import loraforge.methods as methods

    def half(model, cfg):
        for i, p in enumerate(model.parameters()):
            p.requires_grad_(i % 2 == 0)
        return model

    monkeypatch.setattr(methods, "apply_method", half)
    with pytest.raises(ConfigError, match="only .* of parameters are trainable"):
        build(cfg_of(tiny_llama, data_file, method="full"), tiny_llama)


def test_requested_freeze_block_not_trained_is_caught(tiny_llama, data_file):
    from loraforge.methods import verify_trainable
    from loraforge.methods.report import trainable_report
    from loraforge.models.loader import load_model

    cfg = cfg_of(tiny_llama, data_file, method="freeze", freeze_layer_indices=[0])
    model = load_model(tiny_llama, cfg.task_type)
    for name, p in model.named_parameters():
        p.requires_grad_(".1." in name)  # block 1 trains, block 0 (the one asked for) does not
    problems = verify_trainable(trainable_report(model), cfg)
    assert [(p.key, p.value) for p in problems] == [("freeze_layer_indices", 0)]


def test_correct_builds_pass_verification(tiny_llama, data_file):
    for kw in ({}, {"method": "freeze", "freeze_trainable_layers": 1}, {"method": "full"}):
        _model, _loss, report = build(cfg_of(tiny_llama, data_file, **kw), tiny_llama)
        assert 0 < report.trainable <= report.total


def test_train_cli_refuses_before_any_step(tiny_llama, data_file, tmp_path, monkeypatch):
    """Through `loraforge train`: exit code 2 and no checkpoint when the built model disagrees with the config."""
    import contextlib
    import io
    import sys

    import loraforge.methods as methods
    from loraforge.cli import main

    monkeypatch.setattr(methods, "apply_method", lambda model, cfg: model)
    out_dir = tmp_path / "run"
    cfg = tmp_path / "freeze.yaml"
    cfg.write_text(f"base_model: {tiny_llama}\nmetadata_path: {data_file}\nmethod: freeze\n"
                   f"freeze_trainable_layers: 1\noutput_dir: {out_dir}\ncutoff_len: 64\n")
    monkeypatch.setattr(sys, "argv", ["loraforge", "train", str(cfg)])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf), pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2, buf.getvalue()
    assert "nothing was frozen" in buf.getvalue() and "Traceback" not in buf.getvalue()
    assert not list(out_dir.glob("checkpoint-*")) and not (out_dir / "adapter_model.safetensors").exists()


def test_classification_rows_are_not_checked_as_chat(weightless_llama, tmp_path):
    """SEQ_CLS data is {text, label}: preflight must not demand instruction/output, and still summarizes it."""
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps({"text": f"review {i}", "label": "pos" if i % 2 else "neg"}) + "\n"
                            for i in range(6)))
    lines: list[str] = []
    run_preflight(cfg_of(weightless_llama, data, task_type="SEQ_CLS"), echo=lines.append)
    assert "task SEQ_CLS" in lines[0] and "batching padded" in lines[0]
