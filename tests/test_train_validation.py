"""Validation: held-out fraction or count, or a separate file; eval_steps; val loss in metrics.jsonl; early stopping
with patience; the best adapter kept in output_dir and its checkpoint never rotated away."""

import json

import pytest

from test_train_helpers import (adapter, max_weight_diff, records, rows_file, run, tiny_llama,  # noqa: F401
                                val_losses, write_rows)


@pytest.mark.parametrize("how, expected_val", [
    (dict(val_size=0.25), 4),   # a fraction of the 16 rows
    (dict(val_size=3), 3),      # a count
    ("file", 5),                # a separate file
])
def test_validation_sets_and_eval_steps(tiny_llama, rows_file, tmp_path, how, expected_val):
    if how == "file":
        how = dict(val_file=str(write_rows(tmp_path / "val.jsonl", 5, offset=100)))
    out = tmp_path / "r"
    run(tiny_llama, rows_file, out, max_steps=5, eval_steps=2, **how)
    info = json.loads((out / "run.json").read_text())["data"]
    assert info["val_examples"] == expected_val
    assert info["examples"] == 16 - (expected_val if "val_size" in how else 0)
    vals = val_losses(out)
    assert sorted(vals) == [2, 4, 5]  # every eval_steps, and at the end
    assert all(v > 0 for v in vals.values())
    rec = [r for r in records(out) if "val_loss" in r][0]
    assert rec["val_ppl"] == pytest.approx(2.718281828 ** rec["val_loss"], rel=1e-6)


def test_early_stopping_keeps_the_best_adapter_and_its_checkpoint(tiny_llama, tmp_path):
    """Training pushes probability onto a few short answers; the validation answers are long and use other words,
    so validation loss rises from the first evaluation on and early stopping must fire."""
    train_file = write_rows(tmp_path / "train.jsonl", 16, answers=["Yes.", "No."])
    val_file = write_rows(tmp_path / "val.jsonl", 4, answers=[
        "Elephants migrate across savannah grasslands following seasonal rainfall patterns every year.",
        "Quantum chromodynamics describes gluons binding quarks inside protons and neutrons."])
    out = tmp_path / "r"
    result = run(tiny_llama, train_file, out, val_file=str(val_file), max_steps=30, learning_rate=5e-2,
                 target_modules="all-linear", eval_steps=1, early_stopping_patience=2, keep_best_checkpoint=True,
                 save_steps=1, save_total_limit=1)
    vals = val_losses(out)
    best_step = min(vals, key=vals.get)
    assert result.stopped_early and result.global_step < 30
    assert result.global_step == best_step + 2  # two evaluations without improvement, then stop
    assert result.best_val_loss == pytest.approx(vals[best_step])
    assert vals[result.global_step] > vals[best_step]
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["stopped_early"] is True and run_info["best_step"] == best_step

    # the best checkpoint survives rotation (limit 1 keeps only the newest otherwise)
    kept = sorted(p.name for p in out.glob("checkpoint-*"))
    assert kept == sorted({f"checkpoint-{best_step}", f"checkpoint-{result.global_step}"})
    # output_dir holds the best adapter, equal to best/ and to the best step's checkpoint; not the last one
    final = adapter(out)
    assert max_weight_diff(final, adapter(out / "best")) == 0
    assert max_weight_diff(final, adapter(out / f"checkpoint-{best_step}")) == 0
    assert max_weight_diff(final, adapter(out / f"checkpoint-{result.global_step}")) > 0
