"""FSDP2 (torch's fully_shard) over 2 CPU processes with gloo, and multi-node through torchrun's rendezvous: each
run equals one process with the same global batch (2 processes × accumulation 1 ≡ 1 × 2), per-step losses within
1e-5 in fp32, the saved adapter/model too; checkpoints are consolidated and resume on another number of processes.

Every test here starts real `accelerate launch` / `torchrun` processes (the CLI users run); the tiny random LLaMA
keeps each launch to seconds of training, the rest is start-up.
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train_helpers import (REPO, adapter, assert_losses_close, cli_env, make_cfg, max_weight_diff,  # noqa: F401
                                records, rows_file, run, tiny_llama, train_losses, val_losses, wait_for,
                                write_config, write_rows)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (gloo) path")

FSDP_CONFIG = REPO / "configs" / "accelerate" / "fsdp2.yaml"
OPTS = dict(max_steps=4, save_steps=2, batch_size=2, target_modules="all-linear")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate_fsdp(config: Path, *sets: str) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
           "--num_cpu_threads_per_process", "1", "--main_process_port", str(_free_port()),
           "-m", "loraforge", "train", str(config)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _torchrun(config: Path, *sets: str, nproc: int = 2) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(_free_port()), "-m", "loraforge", "train", str(config)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _check(cmd: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def val_file(tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("val") / "val.jsonl", 5, offset=40)  # odd: unequal shares


@pytest.fixture(scope="module")
def single(tiny_llama, rows_file, val_file, tmp_path_factory) -> Path:
    """The one-process reference: accumulation 2 = the 2-process runs' global batch."""
    out = tmp_path_factory.mktemp("single") / "run"
    run(tiny_llama, rows_file, out, gradient_accumulation_steps=2, val_file=str(val_file), eval_steps=2, **OPTS)
    return out


def _logits(model_dir: Path, adapter_dir: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([[1, 5, 9, 42, 7, 3]])).logits


def test_fsdp2_lora_through_accelerate_launch_equals_one_process_and_resumes_on_one(tiny_llama, rows_file,
                                                                                     val_file, single, tmp_path):
    out = tmp_path / "fsdp"
    config = write_config(make_cfg(tiny_llama, rows_file, out, val_file=str(val_file), eval_steps=2, **OPTS),
                          tmp_path / "fsdp.yaml")
    proc = _check(_accelerate_fsdp(config))
    # the shipped accelerate FSDP config really shards (accelerate alone would run DDP on CPU), rank 0 speaks once
    assert proc.stdout.count("FSDP2: 2 layers + root sharded over 2 processes") == 1, proc.stdout[-3000:]
    assert "this process holds 1,586,256 of 3,172,512 parameter values (50.0%)" in proc.stdout
    assert proc.stdout.count("done: 4 steps") == 1

    assert_losses_close(train_losses(out), train_losses(single), tol=1e-5)
    assert_losses_close(val_losses(out), val_losses(single), tol=1e-5)
    for sub in (".", "checkpoint-2", "checkpoint-4"):
        assert max_weight_diff(adapter(out / sub), adapter(single / sub)) < 1e-5
    # rank 0 alone wrote the same files as one process; the adapter is consolidated and loads with plain PEFT
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in single.iterdir())
    assert sorted(p.name for p in (out / "checkpoint-2").iterdir()) == \
        sorted(p.name for p in (single / "checkpoint-2").iterdir())
    assert (_logits(tiny_llama, out) - _logits(tiny_llama, single)).abs().max() < 1e-5
    # the optimizer state is whole (both shards), keyed by parameter name
    opt = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert len(opt["state"]) == 2 * 7 * 2 and all(isinstance(k, str) for k in opt["state"])  # 2 layers × 7 × A, B
    moments = [v["exp_avg"] for v in opt["state"].values()]
    ref = torch.load(single / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert sorted(m.numel() for m in moments) == sorted(v["exp_avg"].numel() for v in ref["state"].values())

    # resume the 2-process FSDP checkpoint on ONE process: steps 3-4 continue exactly
    resumed = tmp_path / "resumed"
    import shutil

    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    run(tiny_llama, rows_file, resumed, gradient_accumulation_steps=2, resume_from_checkpoint="latest",
        overwrite_output_dir=False, **OPTS)
    assert_losses_close(train_losses(resumed), {s: v for s, v in train_losses(single).items() if s > 2}, tol=1e-5)
    assert max_weight_diff(adapter(resumed), adapter(single)) < 1e-5


def test_one_process_checkpoint_resumes_under_fsdp2_with_plain_torchrun(tiny_llama, rows_file, single, tmp_path):
    out = tmp_path / "fsdp-resume"
    import shutil

    shutil.copytree(single / "checkpoint-2", out / "checkpoint-2")  # an index-keyed (one-process) optimizer state
    config = write_config(make_cfg(tiny_llama, rows_file, out, sharding="fsdp2", resume_from_checkpoint="latest",
                                   overwrite_output_dir=False, **OPTS), tmp_path / "c.yaml")
    proc = _check(_torchrun(config))
    assert "FSDP2: 2 layers + root sharded over 2 processes" in proc.stdout
    assert_losses_close(train_losses(out), {s: v for s, v in train_losses(single).items() if s > 2}, tol=1e-5)
    assert max_weight_diff(adapter(out), adapter(single)) < 1e-5
    # renamed to parameter names, so the next resume works on any number of processes too
    assert all(isinstance(k, str) for k in torch.load(out / "checkpoint-4" / "optimizer.pt", weights_only=True)["state"])


@pytest.mark.parametrize("method", ["full", "freeze"])
def test_fsdp2_full_and_freeze_equal_one_process(method, tiny_llama, rows_file, tmp_path):
    from safetensors.torch import load_file

    from loraforge.config import RunConfig

    opts = dict(max_steps=4, save_steps=4, batch_size=2, method=method, learning_rate=1e-3,
                lora_dropout=RunConfig.model_fields["lora_dropout"].default)  # make_cfg's LoRA key at its default
    if method == "freeze":
        opts.update(freeze_trainable_layers=1)
    ref = tmp_path / "single"
    run(tiny_llama, rows_file, ref, gradient_accumulation_steps=2, **opts)
    out = tmp_path / "fsdp"
    proc = _check(_accelerate_fsdp(write_config(make_cfg(tiny_llama, rows_file, out, **opts), tmp_path / "c.yaml")))
    assert "FSDP2: 2 layers + root sharded" in proc.stdout
    assert_losses_close(train_losses(out), train_losses(ref), tol=1e-5)
    a, b = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    assert a.keys() == b.keys() and max_weight_diff(a, b) < 1e-5
    opt = torch.load(out / "checkpoint-4" / "optimizer.pt", weights_only=True)
    ref_opt = torch.load(ref / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert len(opt["state"]) == len(ref_opt["state"]) > 0


def test_two_nodes_of_one_process_with_their_own_rendezvous_equal_one_process(tiny_llama, rows_file, single,
                                                                               tmp_path):
    """The multi-node recipe of docs/TRAINING.md on one machine: two torchrun agents (one per "node"), each with
    its own copy of the data and its own output_dir; they meet at a c10d rendezvous on 127.0.0.1."""
    port, nodes = _free_port(), []
    for rank in (0, 1):
        data = write_rows(tmp_path / f"node{rank}-train.jsonl")  # per-node data: no shared filesystem needed
        out = tmp_path / f"node{rank}-out"
        config = write_config(make_cfg(tiny_llama, data, out, sharding="fsdp2", **OPTS), tmp_path / f"node{rank}.yaml")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(rank), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
               "--rdzv_id", "h19-two-nodes", "-m", "loraforge", "train", str(config)]
        log = (tmp_path / f"node{rank}.log").open("w")
        nodes.append((out, subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=log, stderr=subprocess.STDOUT)))
    for _, p in nodes:
        assert p.wait(timeout=400) == 0, (tmp_path / "node0.log").read_text()[-3000:] + \
            (tmp_path / "node1.log").read_text()[-3000:]
    node0, node1 = nodes[0][0], nodes[1][0]
    assert_losses_close(train_losses(node0), train_losses(single), tol=1e-5)
    assert max_weight_diff(adapter(node0), adapter(single)) < 1e-5
    # the global rank 0 alone wrote a run dir; the other node left its output_dir empty
    assert (node0 / "checkpoint-4" / "trainer_state.json").is_file()
    assert not node1.exists() or list(node1.iterdir()) == []
    state = json.loads((node0 / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["world_size"] == 2


def test_kill_9_of_one_rank_stops_the_other_and_the_run_resumes_exactly_on_one_process(tiny_llama, rows_file,
                                                                                        tmp_path):
    import psutil

    out = tmp_path / "killed"
    config = write_config(make_cfg(tiny_llama, rows_file, out, sharding="fsdp2", max_steps=100000, save_steps=2,
                                   batch_size=2, target_modules="all-linear"), tmp_path / "c.yaml")
    log = (tmp_path / "torchrun.log").open("w")
    agent = subprocess.Popen(_torchrun(config), cwd=REPO, env=cli_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (out / "checkpoint-4" / "trainer_state.json").is_file(), agent, timeout=300,
                 what="checkpoint-4")
        workers = sorted(psutil.Process(agent.pid).children(), key=lambda p: p.pid)
        assert len(workers) == 2
        os.kill(workers[1].pid, signal.SIGKILL)  # one rank dies; torchrun must stop the other
        code = agent.wait(timeout=120)
    finally:
        agent.kill()
    assert code != 0
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    last = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file())

    # resume on one process: it continues exactly where a run that was never killed would be
    run(tiny_llama, rows_file, out, gradient_accumulation_steps=2, max_steps=last + 2, save_steps=2,
        target_modules="all-linear", resume_from_checkpoint="latest", overwrite_output_dir=False)
    assert not list(out.glob(".tmp-*"))  # a checkpoint half-written at the kill was never picked up
    ref = tmp_path / "ref"
    run(tiny_llama, rows_file, ref, gradient_accumulation_steps=2, max_steps=last + 2, save_steps=None,
        target_modules="all-linear")
    resumed = {s: v for s, v in train_losses(out).items() if s > last}
    assert_losses_close(resumed, {s: v for s, v in train_losses(ref).items() if s > last}, tol=1e-5)
    assert max_weight_diff(adapter(out), adapter(ref)) < 1e-5


def test_fsdp2_refuses_qlora_fsdp1_and_generation_metrics_with_the_reason(tiny_llama, rows_file, tmp_path,
                                                                           monkeypatch):
    from loraforge.errors import ConfigError
    from loraforge.train.sharding import sharding_for

    with pytest.raises(ConfigError, match="Params4bit"):
        sharding_for(make_cfg(tiny_llama, rows_file, tmp_path, sharding="fsdp2", method="qlora"))
    with pytest.raises(ConfigError, match="rank 0 alone"):
        sharding_for(make_cfg(tiny_llama, rows_file, tmp_path, sharding="fsdp2", eval_generation_metric="rouge_l",
                                  val_size=0.25))
    assert not sharding_for(make_cfg(tiny_llama, rows_file, tmp_path)).fsdp  # DDP stays the default
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` exports for an FSDP config
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="FSDP2 only"):
        sharding_for(make_cfg(tiny_llama, rows_file, tmp_path))
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(ConfigError, match="fsdp_offload_params"):
        sharding_for(make_cfg(tiny_llama, rows_file, tmp_path))
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "false")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    s = sharding_for(make_cfg(tiny_llama, rows_file, tmp_path))
    assert s.fsdp and not s.reshard_after_forward


def test_validate_refuses_what_fsdp2_cannot_run_before_any_process_starts(tiny_llama, rows_file, tmp_path):
    from loraforge.preflight import PreflightError, run_preflight

    with pytest.raises(PreflightError) as err:
        run_preflight(make_cfg(tiny_llama, rows_file, tmp_path, sharding="fsdp2", method="qlora"), echo=lambda _: None)
    assert [p.key for p in err.value.problems] == ["method"] and "Params4bit" in str(err.value)
    run_preflight(make_cfg(tiny_llama, rows_file, tmp_path, sharding="fsdp2"), echo=lambda _: None)  # lora: fine
