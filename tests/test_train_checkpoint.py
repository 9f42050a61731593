"""Checkpoints: written every save_steps, rotated, resumed exactly (latest / explicit path / after a real kill -9),
never taken from a half-written temp dir; init_adapter continues an adapter with a fresh optimizer."""

import json
import shutil
import signal

import pytest
import torch

from test_train_helpers import (adapter, assert_losses_close, make_cfg, max_weight_diff, records,  # noqa: F401
                                rows_file, run, start_cli, stop, tiny_llama, train_losses, wait_for, write_config)

STEPS = 8
CKPT_FILES = {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt",
              "rng_py.json", "trainer_state.json", "README.md", "manifest.json"}


@pytest.fixture(scope="module")
def reference(tiny_llama, rows_file, tmp_path_factory):
    """An uninterrupted run with a checkpoint every 2 steps; cosine schedule so a wrong resumed step shows."""
    out = tmp_path_factory.mktemp("ckpt") / "reference"
    run(tiny_llama, rows_file, out, max_steps=STEPS, save_steps=2, lr_scheduler="cosine", warmup_steps=2)
    return out


def _resume_cfg(tiny_llama, rows_file, out, resume):
    return dict(model_dir=tiny_llama, data=rows_file, out=out, max_steps=STEPS, save_steps=2, lr_scheduler="cosine",
                warmup_steps=2, overwrite_output_dir=False, resume_from_checkpoint=resume)


def test_a_checkpoint_every_save_steps_with_everything_to_resume(reference):
    assert sorted(p.name for p in reference.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in (2, 4, 6, 8)]
    ckpt = reference / "checkpoint-4"
    assert {p.name for p in ckpt.iterdir()} == CKPT_FILES
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["group"] == 4 and state["epoch"] == 0
    assert state["tokens_seen"] == records(reference)[3]["tokens"]
    assert torch.load(ckpt / "scheduler.pt", weights_only=True)["last_epoch"] == 4
    assert not list(reference.glob(".tmp-*"))


def test_save_total_limit_keeps_the_newest(tiny_llama, rows_file, tmp_path):
    run(tiny_llama, rows_file, tmp_path / "r", max_steps=5, save_steps=1, save_total_limit=2)
    assert sorted(p.name for p in (tmp_path / "r").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]


def _interrupted_copy(reference, dest, keep_until: int):
    """The reference run as it stood after checkpoint `keep_until` (later checkpoints and final files gone)."""
    shutil.copytree(reference, dest)
    for p in dest.iterdir():
        if p.name.startswith("checkpoint-") and int(p.name.split("-")[1]) > keep_until:
            shutil.rmtree(p)
        elif p.is_file() and p.name in ("adapter_model.safetensors", "run.json"):
            p.unlink()
    lines = (dest / "metrics.jsonl").read_text().splitlines()
    # the interrupted run had logged one step past its checkpoint, and half a line when it died
    (dest / "metrics.jsonl").write_text("\n".join(lines[:keep_until + 1]) + '\n{"step": ')


def test_resume_latest_ignores_half_written_checkpoints_and_continues_exactly(reference, tiny_llama, rows_file,
                                                                           tmp_path):
    out = tmp_path / "resumed"
    _interrupted_copy(reference, out, keep_until=4)
    # a crash in the middle of writing checkpoint-6: a temp dir with some files, and a dir lacking its state file
    partial = out / ".tmp-checkpoint-6"
    partial.mkdir()
    shutil.copy(out / "checkpoint-4" / "adapter_model.safetensors", partial)
    incomplete = out / "checkpoint-7"
    shutil.copytree(out / "checkpoint-4", incomplete)
    (incomplete / "trainer_state.json").unlink()

    result = run(**_resume_cfg(tiny_llama, rows_file, out, "latest"))
    assert result.global_step == STEPS
    assert not partial.exists()
    assert_losses_close(train_losses(out), train_losses(reference), tol=1e-5)
    assert [r["step"] for r in records(out)] == list(range(1, STEPS + 1))  # no duplicates from the first attempt
    assert max_weight_diff(adapter(out), adapter(reference)) < 1e-5


def test_resume_from_an_explicit_checkpoint_path(reference, tiny_llama, rows_file, tmp_path):
    out = tmp_path / "explicit"
    _interrupted_copy(reference, out, keep_until=6)
    result = run(**_resume_cfg(tiny_llama, rows_file, out, str(out / "checkpoint-2")))
    assert result.global_step == STEPS
    assert_losses_close(train_losses(out), train_losses(reference), tol=1e-5)
    assert max_weight_diff(adapter(out), adapter(reference)) < 1e-5


def test_resume_errors_name_the_key(tiny_llama, rows_file, tmp_path):
    from loraforge.errors import ConfigError

    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as e:
        run(**_resume_cfg(tiny_llama, rows_file, tmp_path / "empty", "latest"))
    assert "resume_from_checkpoint" in e.value.format()
    with pytest.raises(ConfigError) as e:
        run(**_resume_cfg(tiny_llama, rows_file, tmp_path / "empty", str(tmp_path / "nope")))
    assert "not a complete loraforge checkpoint" in e.value.format()


def test_resuming_with_another_data_split_is_refused(reference, tiny_llama, rows_file, tmp_path):
    """Step k of a run with another batch size or accumulation holds other examples: not an exact resume."""
    from loraforge.errors import ConfigError

    out = tmp_path / "changed"
    _interrupted_copy(reference, out, keep_until=4)
    with pytest.raises(ConfigError) as e:
        run(**dict(_resume_cfg(tiny_llama, rows_file, out, "latest"), batch_size=4, gradient_accumulation_steps=2))
    text = e.value.format()
    assert "batch_size = 2, this run has 4" in text and "micro_batches_per_step = 1, this run has 2" in text
    assert "init_adapter" in text


def test_kill_9_mid_run_then_resume_matches_an_uninterrupted_run(tiny_llama, rows_file, tmp_path):
    """A real `loraforge train` process is SIGKILLed after its second checkpoint; `resume_from_checkpoint: latest`
    then reproduces the uninterrupted run's per-step losses. LoRA dropout is on: the restored RNG state matters."""
    steps = 30
    opts = dict(max_steps=steps, save_steps=3, lr_scheduler="linear", warmup_steps=3, lora_dropout=0.2)
    out = tmp_path / "killed"
    config = write_config(make_cfg(tiny_llama, rows_file, out, **opts), tmp_path / "run.yaml")
    proc = start_cli(config, log_dir=tmp_path / "logs")
    try:
        wait_for(lambda: (out / "checkpoint-6" / "trainer_state.json").is_file() and
                 max((r["step"] for r in records(out)), default=0) >= 7, proc, what="checkpoint-6 and step 7")
    finally:
        code = stop(proc, signal.SIGKILL)
    assert code == -signal.SIGKILL, (tmp_path / "logs" / "stderr.txt").read_text()[-2000:]
    done = max(r["step"] for r in records(out))
    assert done < steps, "the run finished before it was killed: nothing was tested"

    # a half-written checkpoint beyond the last complete one must not be picked up
    partial = out / f".tmp-checkpoint-{steps}"
    partial.mkdir(exist_ok=True)
    (partial / "trainer_state.json").write_text("{")
    run(tiny_llama, rows_file, out, overwrite_output_dir=False, resume_from_checkpoint="latest", **opts)
    run(tiny_llama, rows_file, tmp_path / "uninterrupted", **opts)
    assert_losses_close(train_losses(out), train_losses(tmp_path / "uninterrupted"), tol=1e-5)
    assert max_weight_diff(adapter(out), adapter(tmp_path / "uninterrupted")) < 1e-5


def test_init_adapter_starts_from_its_weights_with_a_fresh_optimizer(reference, tiny_llama, rows_file, tmp_path):
    out = tmp_path / "continued"
    result = run(tiny_llama, rows_file, out, init_adapter=str(reference), max_steps=1, save_steps=1,
                 learning_rate=1e-9)
    assert result.global_step == 1
    # a learning rate of 1e-9 barely moves the weights: the run started from the given adapter, not a new one
    assert max_weight_diff(adapter(out), adapter(reference)) < 1e-6
    first_loss = train_losses(out)[1]
    assert first_loss < train_losses(reference)[1] - 1e-3  # the reference's step-1 loss is that of a fresh adapter
    # fresh optimizer: one AdamW step taken, not the reference's eight
    opt = torch.load(out / "checkpoint-1" / "optimizer.pt", weights_only=True)
    assert {float(s["step"]) for s in opt["state"].values()} == {1.0}
    assert json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["global_step"] == 1


def test_resume_from_a_checkpoint_trained_on_other_data_continues_training(reference, tiny_llama, tmp_path):
    """The article's incremental training (issue 14): `resume_from_checkpoint` at another run's checkpoint, new
    data, an output_dir that does not exist yet: a new run from the checkpoint's weights with a fresh optimizer."""
    from test_train_helpers import write_rows

    new_data = write_rows(tmp_path / "new.jsonl", n=12, offset=100)
    out = tmp_path / "new" / "run"
    said: list[str] = []
    cfg = make_cfg(tiny_llama, new_data, out, max_steps=1, save_steps=1, learning_rate=1e-9,
                   overwrite_output_dir=False, resume_from_checkpoint=str(reference / "checkpoint-4"))
    from loraforge.train.loop import train

    result = train(cfg, echo=said.append)
    assert result.global_step == 1  # counted from 0: not step 5 of the old run
    (line,) = [s for s in said if s.startswith("continuing from the weights of")]
    assert "fresh optimizer" in line and str(reference / "checkpoint-4") in line
    assert max_weight_diff(adapter(out), adapter(reference / "checkpoint-4")) < 1e-6  # started from its weights
    opt = torch.load(out / "checkpoint-1" / "optimizer.pt", weights_only=True)
    assert {float(s["step"]) for s in opt["state"].values()} == {1.0}
    assert json.loads((out / "run.json").read_text())["continued_from"] == str(reference / "checkpoint-4")
    # the reference left target_modules out: the saved configs name every linear layer of the blocks
    from loraforge.config import load_config

    blocks = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert load_config(reference / "config.yaml").target_modules == load_config(out / "config.yaml").target_modules == blocks


def test_same_data_with_another_seed_is_still_refused(reference, tiny_llama, rows_file, tmp_path):
    """Same data, other seed: an interrupted run resumed by mistake, not continued training."""
    from loraforge.errors import ConfigError

    out = tmp_path / "seeded"
    _interrupted_copy(reference, out, keep_until=4)
    with pytest.raises(ConfigError) as e:
        run(**dict(_resume_cfg(tiny_llama, rows_file, out, "latest"), seed=7))
    assert "seed = 0, this run has 7" in e.value.format()
