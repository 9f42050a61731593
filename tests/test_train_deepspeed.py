"""DeepSpeed ZeRO-2/3: the shipped accelerate configs load and build accelerate's DeepSpeedPlugin; on a CPU-only
machine loraforge refuses DeepSpeed (accelerate 1.15 would run DDP instead: measured, see train/sharding.py);
the real 2-process ZeRO run equal to one process needs CUDA (`cuda` marker)."""

import subprocess
import sys

import pytest
import torch

from test_train_helpers import (REPO, assert_losses_close, cli_env, make_cfg, rows_file, run, tiny_llama,  # noqa: F401
                                train_losses, write_config)

ACCELERATE = REPO / "configs" / "accelerate"


@pytest.mark.parametrize("stage", [2, 3])
def test_shipped_deepspeed_configs_build_accelerates_plugin(stage):
    pytest.importorskip("deepspeed")
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin

    cluster = load_config_from_file(str(ACCELERATE / f"deepspeed-zero{stage}.yaml"))
    assert str(cluster.distributed_type).endswith("DEEPSPEED")
    plugin = DeepSpeedPlugin(**cluster.deepspeed_config)
    assert plugin.zero_stage == stage and plugin.deepspeed_config["zero_optimization"]["stage"] == stage
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only refusal")
def test_deepspeed_without_cuda_is_refused_instead_of_silently_running_ddp(tiny_llama, rows_file, tmp_path,
                                                                           monkeypatch):
    from loraforge.errors import ConfigError
    from loraforge.train.sharding import sharding_for

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` exports for a DeepSpeed config
    with pytest.raises(ConfigError, match="DeepSpeed through accelerate needs CUDA"):
        sharding_for(make_cfg(tiny_llama, rows_file, tmp_path))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_two_gpus_equal_one_process(stage, tiny_llama, rows_file, tmp_path):
    pytest.importorskip("deepspeed")
    opts = dict(max_steps=4, batch_size=2, target_modules="all-linear", gradient_accumulation_steps=1)
    out = tmp_path / "ds"
    config = write_config(make_cfg(tiny_llama, rows_file, out, **opts), tmp_path / "ds.yaml")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ACCELERATE / f"deepspeed-zero{stage}.yaml"), "-m", "loraforge", "train", str(config)]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = tmp_path / "single"
    run(tiny_llama, rows_file, ref, **dict(opts, gradient_accumulation_steps=2))
    assert_losses_close(train_losses(out), train_losses(ref), tol=1e-4)
