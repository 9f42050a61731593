"""Which precision a run trains in. Torch is imported inside the functions, so `estimate` and `preflight` can use
this without importing torch at module import."""

from __future__ import annotations

from typing import Any


def resolve_precision(precision: str) -> str:
    """`auto` → bf16 where the hardware does it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX), fp16 on
    older GPUs, else fp32. On a CPU without bf16 instructions autocast is emulated and slower than fp32."""
    if precision != "auto":
        return precision
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def cpu_has_native_bf16() -> bool:
    """The CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere CPU autocast to bf16 is emulated."""
    import torch

    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return bool(native and torch.backends.cpu.get_cpu_capability())


def autocast_dtype(precision: str) -> Any:
    """The autocast dtype of a resolved precision (`torch.bfloat16`, `torch.float16`), None for fp32."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
