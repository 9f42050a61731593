"""The corpus of bad configs and data files under tests/bad/: each must fail `loraforge validate` with exit code 2,
no traceback, and a message holding the exact parts listed here (key, bad value, suggestion).

Model-dependent cases point at tiny random models whose weight files were removed: a case that tried to load
weights could not produce its expected message, so every case also proves that preflight reads no weights.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BAD = Path(__file__).parent / "bad"

# file (under tests/bad/configs, without .yaml) -> substrings the error output must contain
EXPECTED: dict[str, list[str]] = {
    # --- config keys, types, ranges, enums, conflicts (fail before torch is imported) ---
    "typo_learning_rate": ["learnig_rate: unknown key", "did you mean `learning_rate`?"],
    "typo_lora_rank": ["lora_rnak: unknown key", "did you mean `lora_rank`?"],
    "typo_target_module": ["target_module: unknown key", "did you mean `target_modules`?"],
    "typo_grad_accum": ["gradient_accumulation_step: unknown key", "`gradient_accumulation_steps`"],
    "type_batch_size": ["batch_size: must be an integer", "(got 'four')", "batch_size: 4"],
    "type_epochs_list": ["epochs: must be a number", "(got [1, 2])", "epochs: 3"],
    "type_bool": ["gradient_checkpointing: must be true or false", "(got 'maybe')"],
    "type_target_modules_number": ["target_modules: must be a list of strings, a string or null", "(got 5)",
                                   "[q_proj, v_proj]"],
    "range_rank_zero": ["lora_rank: must be greater than 0", "(got 0)", "allowed: > 0", "lora_rank: 8"],
    "range_dropout_one": ["lora_dropout: must be less than 1", "(got 1.0)", "allowed: >= 0 and < 1", "lora_dropout: 0.05"],
    "range_lr_negative": ["learning_rate: must be greater than 0", "(got '-1e-4')", "learning_rate: 2.0e-4"],
    "range_warmup_negative": ["warmup_steps: must be at least 0", "(got -5)", "allowed: >= 0"],
    "range_cutoff_zero": ["cutoff_len: must be greater than 0", "(got 0)", "cutoff_len: 1024"],
    "enum_method": ["method: is not one of the allowed values", "(got 'lorra')",
                    "allowed: lora, qlora, prefix, ptuning, prompt, freeze, full", "did you mean `lora`?"],
    "enum_scheduler": ["lr_scheduler: is not one of the allowed values", "(got 'cosine_with_restarts')",
                       "allowed: constant, linear, cosine"],
    "enum_precision": ["precision: is not one of the allowed values", "(got 'bf32')", "allowed: auto, fp32, bf16, fp16",
                       "did you mean `fp32`?"],
    "enum_task_type": ["task_type: unknown task type", "(got 'text-generaton')", "SEQ_2_SEQ_LM",
                       "did you mean `text-generation`?"],
    "conflict_method_keys": ["lora_rank: only applies to method lora / qlora, but method is `full`", "(got 16)",
                             "remove `lora_rank` or set `method: lora`"],
    "conflict_warmup": ["warmup_ratio: warmup_steps (10) and warmup_ratio are both set", "(got 0.1)", "keep one"],
    "conflict_early_stop_no_val": ["early_stopping_patience: needs a validation set", "(got 3)", "val_size: 0.1"],
    "conflict_packed_seq_cls": ["batching: packing is only for CAUSAL_LM", "(got 'packed')", "batching: grouped"],
    "conflict_alias_twice": ["lora_rank: sets `lora_rank` a second time (already set by `r`)", "(got 16)",
                             "keep only one of `r` and `lora_rank`"],
    "many_mistakes": ["4 problems", "did you mean `learning_rate`?", "lora_rank: must be greater than 0",
                      "did you mean `cosine`?", "batch_size: must be an integer", "(got 2.5)"],
    "yaml_syntax": ["not valid YAML", "yaml_syntax.yaml:3"],
    "no_training_data": ["metadata_path: no training data given", "metadata_path: data/train.jsonl"],
    # --- model: existence, task type vs architecture, target_modules vs the real module names ---
    "article_seed": ["base_model: not a built-in model name and no such file or folder", "./models/chatglm3-6b",
                     "metadata_path: training data file not found", "data/medical_qa/train.jsonl"],
    "model_name_typo": ["base_model: not a built-in model name", "(got 'smollm')", "did you mean `smollm2`?"],
    "seq2seq_on_llama": ["task_type: `llama` is a decoder-only model", "(got 'SEQ_2_SEQ_LM')",
                         "set `task_type: CAUSAL_LM`"],
    "causal_on_t5": ["task_type: `t5` is an encoder-decoder model", "(got 'CAUSAL_LM')", "set `task_type: SEQ_2_SEQ_LM`"],
    "chatglm_seq2seq": ["task_type: `chatglm` is a decoder-only model", "registers AutoModelForSeq2SeqLM",
                        "set `task_type: CAUSAL_LM`"],
    "chatglm_no_remote_code": ["trust_remote_code:", "(got False)", "trust_remote_code: true"],
    "fused_qkv_query_proj": ["target_modules[0]: no module of this model is named `query_proj`", "(got 'query_proj')",
                             "use `query_key_value` instead of `query_proj`",
                             "target_modules[1]: no module of this model is named `value_proj`",
                             "allowed: query_key_value, dense, dense_h_to_4h, dense_4h_to_h"],
    "t5_names_on_llama": ["target_modules[0]: no module of this model is named `q`", "use `q_proj` instead of `q`",
                          "use `v_proj` instead of `v`", "target_modules: [q_proj, v_proj]"],
    "partial_target_match": ["target_modules[1]: no module of this model is named `query_key_value`",
                             "(got 'query_key_value')", "`q_proj`", "`k_proj`", "`v_proj`"],
    "regex_matches_nothing": ["target_modules: the regex matches no module", "(got 'q_proj')", "[q_proj]"],
    "packed_on_gpt_neox": ["batching: packing is not safe for model type `gpt_neox`", "(got 'packed')",
                           "batching: grouped"],
    # --- data: files, every bad line as file:line ---
    "missing_data_file": ["metadata_path: training data file not found", "does_not_exist.jsonl"],
    "missing_data_dir": ["train_data_dir: training data directory not found", "no_such_folder"],
    "missing_val_file": ["val_file: validation data file not found", "no_val.jsonl", "val_size: 0.1"],
    "data_bad_json": ["bad_json.jsonl:2: invalid JSON"],
    "data_missing_output": ["missing_output.jsonl:2: missing `output`", 'allowed: {"instruction", "input"?, "output"}'],
    "data_empty_output": ["empty_output.jsonl:2: empty output", "write the answer the model should learn"],
    "data_wrong_role_order": ["wrong_role_order.jsonl:2: wrong role order: messages[0] is `assistant`, expected `user`",
                              "wrong_role_order.jsonl:3: wrong role order: messages[1] is `user`, expected `assistant`"],
    "data_messages_not_list": ["messages_not_list.jsonl:1: `messages` must be a non-empty list of turns"],
    "data_unknown_row_shape": ["unknown_row_shape.jsonl:1: row has neither `instruction`/`output` nor `messages`",
                           "['question', 'answer']"],
    "data_empty_file": ["empty_file.jsonl", "no examples found"],
    # --- run dir and adapters ---
    "output_dir_has_run": ["output_dir: already holds a training run (run.json)", "previous_run",
                           "resume_from_checkpoint: latest", "overwrite_output_dir: true"],
    "resume_without_checkpoint": ["resume_from_checkpoint: no complete checkpoint", "(got 'latest')",
                                  "remove resume_from_checkpoint"],
    "init_adapter_not_adapter": ["init_adapter: not an adapter folder (no adapter_config.json)",
                                 "finished run's output_dir"],
    # --- text-to-image routes to the image recipe's own checks ---
    "image_missing_model": ["base_model: no local Stable Diffusion model at this path", "no_sd_model"],
}


def test_corpus_is_complete():
    files = {p.stem for p in (BAD / "configs").glob("*.yaml")}
    assert files == set(EXPECTED), (files ^ set(EXPECTED))
    assert len(files) >= 30


@pytest.fixture(scope="module")
def corpus_models(tmp_path_factory) -> Path:
    """Tiny random llama / t5 / gpt_neox models with their weight files removed, and a chatglm config."""
    from loraforge.config import TaskType
    from loraforge.models.tiny import tiny_model_dir, tiny_remote_config_dir

    built = tmp_path_factory.mktemp("tiny")
    root = tmp_path_factory.mktemp("weightless")
    for family, task in (("llama", TaskType.CAUSAL_LM), ("t5", TaskType.SEQ_2_SEQ_LM), ("gpt_neox", TaskType.CAUSAL_LM)):
        src = tiny_model_dir(family, built, task)
        shutil.copytree(src, root / family, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
        assert not list((root / family).glob("*.safetensors"))
    tiny_remote_config_dir("chatglm", root)
    return root


def run_validate(config: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "loraforge", "validate", str(config)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def expand(name: str, models: Path, out_dir: Path) -> Path:
    text = (BAD / "configs" / f"{name}.yaml").read_text()
    text = text.replace("{models}", str(models)).replace("{data}", str(BAD / "data"))
    path = out_dir / f"{name}.yaml"
    path.write_text(text)
    return path


def validate_in_process(config: Path) -> tuple[int, str]:
    """`loraforge validate CONFIG` through the CLI's own entry point (`loraforge.cli.main`), in this process:
    the same argument parsing, error formatting and exit code as the console script, without paying Python +
    torch start-up per file (46 files × ~10 s on a busy 2-core machine). `test_cli_errors.py` runs real
    subprocesses."""
    import contextlib
    import io

    from loraforge.cli import main

    out = io.StringIO()
    argv = sys.argv
    sys.argv = ["loraforge", "validate", str(config)]
    code: int | str | None = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                main()
            except SystemExit as e:
                code = e.code
            except Exception:  # noqa: BLE001 — a traceback is itself a failure of this test
                import traceback

                out.write("Traceback (in process):\n" + traceback.format_exc())
                code = -1
    finally:
        sys.argv = argv
    return int(code or 0), out.getvalue()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_file_fails_validate_with_its_message(name, corpus_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths of the article's YAML resolve here, where nothing exists
    code, out = validate_in_process(expand(name, corpus_models, tmp_path))
    missing = [s for s in EXPECTED[name] if s not in out]
    assert code == 2 and "Traceback" not in out and not missing, f"exit {code}, missing {missing}\n{out}"


def test_good_config_on_weightless_model_validates(corpus_models, tmp_path):
    """config.json + tokenizer and no weight files: validate passes, so preflight never reads weights."""
    cfg = tmp_path / "good.yaml"
    cfg.write_text(f"base_model: {corpus_models / 'llama'}\nmetadata_path: {BAD / 'data' / 'good.jsonl'}\n"
                   "target_modules: [q_proj, v_proj]\ncutoff_len: 64\n")
    res = run_validate(cfg, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "preflight OK: llama (decoder-only)" in res.stdout
    assert "no weight files" in res.stdout
