"""Faults of a real `loraforge train` process: SIGTERM / Ctrl-C write a checkpoint and exit 143 / 130 with a resume
hint, and the run then continues from it; a diverging run stops with exit 2 naming the step, its checkpoints good."""

import json
import signal

import pytest
import torch

from test_train_helpers import (adapter, make_cfg, records, rows_file, run, start_cli, stop, tiny_llama,  # noqa: F401
                                train_losses, wait_for, write_config)


def test_sigterm_and_sigint_checkpoint_exit_and_resume(tiny_llama, rows_file, tmp_path):
    # Both processes start together (their start-up is most of the time); each is signalled once it is training.
    procs = {}
    for name, sig in [("term", signal.SIGTERM), ("int", signal.SIGINT)]:
        out = tmp_path / name
        config = write_config(make_cfg(tiny_llama, rows_file, out, max_steps=100000, save_steps=None),
                              tmp_path / f"{name}.yaml")
        procs[name] = (sig, out, start_cli(config, log_dir=tmp_path / f"logs-{name}"))
    codes = {}
    for name, (sig, out, proc) in procs.items():
        try:
            wait_for(lambda: len(records(out)) >= 2, proc, what=f"{name}: two logged steps")
        except AssertionError:
            for _, _, p in procs.values():
                p.kill()
            raise
        codes[name] = stop(proc, sig)
    for name, (sig, out, proc) in procs.items():
        stderr = (tmp_path / f"logs-{name}" / "stderr.txt").read_text()
        assert codes[name] == 128 + sig, stderr[-2000:]
        step = max(r["step"] for r in records(out))
        ckpt = out / f"checkpoint-{step}"
        assert (ckpt / "trainer_state.json").is_file(), sorted(p.name for p in out.iterdir())
        assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == step
        assert f"checkpoint written to {ckpt}" in stderr and "resume_from_checkpoint=latest" in stderr

        # resuming continues from that checkpoint (constant lr: a shorter max_steps leaves the schedule unchanged)
        result = run(tiny_llama, rows_file, out, max_steps=step + 2, overwrite_output_dir=False,
                     resume_from_checkpoint="latest")
        assert result.global_step == step + 2
        assert sorted(train_losses(out)) == list(range(1, step + 3))


def test_diverging_run_exits_2_naming_the_step_and_keeps_the_good_checkpoint(tiny_llama, rows_file, tmp_path):
    """learning_rate 1e6: step 1 is finite and checkpointed; step 2's gradients are NaN. The run must stop before
    the optimizer turns the weights to NaN, so checkpoint-1 stays a good, loadable adapter."""
    out = tmp_path / "nan"
    config = write_config(make_cfg(tiny_llama, rows_file, out, learning_rate=1e6, max_steps=8, save_steps=1,
                                   target_modules="all-linear"), tmp_path / "nan.yaml")
    proc = start_cli(config, log_dir=tmp_path / "logs")
    code = proc.wait(timeout=300)
    stderr = (tmp_path / "logs" / "stderr.txt").read_text()
    assert code == 2, stderr[-2000:]
    assert "step 2:" in stderr and "nan" in stderr.lower() and "learning_rate" in stderr
    assert f"last good checkpoint: {out / 'checkpoint-1'}" in stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    weights = adapter(out / "checkpoint-1")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert any(float(w.abs().max()) > 1e3 for k, w in weights.items() if "lora_B" in k)  # it did take the huge step
    assert not (out / "adapter_model.safetensors").exists()  # no final adapter from a diverged run


def test_nan_loss_names_the_step(tiny_llama, rows_file, tmp_path):
    """A poisoned base model (NaN in a norm weight) gives a NaN loss at step 1: no checkpoint exists yet."""
    import shutil

    from safetensors.torch import load_file, save_file

    from loraforge.train.loop import TrainingDiverged

    poisoned = tmp_path / "poisoned"
    shutil.copytree(tiny_llama, poisoned)
    state = load_file(poisoned / "model.safetensors")
    state["model.norm.weight"][0] = float("nan")
    save_file(state, poisoned / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(TrainingDiverged) as e:
        run(poisoned, rows_file, tmp_path / "out", save_steps=1)
    text = e.value.format()
    assert "step 1: loss is nan" in text and "last good checkpoint: none" in text
