"""Precision: fp32; bf16 autocast trains on CPU with fp32 adapter weights; `auto` resolves to bf16 only where the
CPU has native bf16 (and the resolved value is what the run dir's config.yaml records); fp16 on CPU is refused."""

from pathlib import Path

import pytest
import torch
import yaml

from test_train_helpers import adapter, rows_file, run, tiny_llama, train_losses  # noqa: F401


def _cpu_has_native_bf16() -> bool:
    """Read from the kernel's CPU flags, independently of torch's own probe."""
    flags = Path("/proc/cpuinfo")
    if not flags.is_file():
        pytest.skip("no /proc/cpuinfo to check the CPU's bf16 support against")
    text = flags.read_text()
    return "avx512_bf16" in text or "amx_bf16" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU rule")
def test_auto_resolves_by_cpu_support_and_is_recorded(tiny_llama, rows_file, tmp_path):
    from loraforge.train.setup import resolve_precision

    expected = "bf16" if _cpu_has_native_bf16() else "fp32"
    assert resolve_precision("auto") == expected
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"
    run(tiny_llama, rows_file, tmp_path / "auto", precision="auto", max_steps=1)
    saved = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())
    assert saved["precision"] == expected


def test_bf16_autocast_trains_with_fp32_adapter_weights(tiny_llama, rows_file, tmp_path):
    run(tiny_llama, rows_file, tmp_path / "fp32", precision="fp32", max_steps=3, save_steps=3)
    run(tiny_llama, rows_file, tmp_path / "bf16", precision="bf16", max_steps=3, save_steps=3)
    l32, l16 = train_losses(tmp_path / "fp32"), train_losses(tmp_path / "bf16")
    assert l16.keys() == l32.keys()
    diffs = [abs(l16[s] - l32[s]) for s in l32]
    assert max(diffs) < 0.05  # same training…
    assert max(diffs) > 0     # …but really computed under bf16 autocast
    weights = adapter(tmp_path / "bf16")
    assert {w.dtype for w in weights.values()} == {torch.float32}
    opt = torch.load(tmp_path / "bf16" / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert {s["exp_avg"].dtype for s in opt["state"].values()} == {torch.float32}
    assert yaml.safe_load((tmp_path / "bf16" / "config.yaml").read_text())["precision"] == "bf16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is allowed on CUDA")
def test_fp16_on_cpu_is_a_config_error(tiny_llama, rows_file, tmp_path):
    from loraforge.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        run(tiny_llama, rows_file, tmp_path / "fp16", precision="fp16")
    text = e.value.format()
    assert "precision" in text and "fp16" in text and "bf16" in text
    out = tmp_path / "fp16"
    assert not out.exists() or not any(out.iterdir())  # refused before anything was written (the run lock is gone)
