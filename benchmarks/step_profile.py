"""Where a training step's time goes: torch.profiler over a few optimizer steps, grouped into
matmul / attention / elementwise / optimizer / data / Python-other, as shares of the profiled steps' wall time.

Every profiler event's *self* time (its time minus its children's) goes to one group, decided by the event and the
events around it:
* optimizer: anything inside `loraforge:optimizer` (clipping, AdamW, scheduler, zero_grad; the benchmark wraps
  loraforge's `update`) or torch's own `Optimizer.step` / `Optimizer.zero_grad` ranges;
* data: anything inside `loraforge:data` (collating a micro-batch; the benchmark wraps `Setup.collate`);
* attention: `scaled_dot_product_attention` / flash-attention ops, forward and backward, and what they call;
* matmul: `mm`, `addmm`, `bmm`, `matmul`, `linear` and what they call;
* elementwise: every other ATen op (adds, multiplies, casts and copies, norms, activations, softmax, embedding ...);
* Python-other: the rest of the step's wall time, which no ATen op accounts for: Python code between ops,
  autograd's bookkeeping, and the profiler's own overhead (so this share is an upper bound).
"""

from __future__ import annotations

from collections import defaultdict

GROUPS = ("matmul", "attention", "elementwise", "optimizer", "data", "Python-other")
_MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear", "aten::addmv",
           "aten::mv", "aten::dot", "aten::_addmm_activation"}
_ATTENTION = ("scaled_dot_product", "flash_attention", "efficient_attention")


def _own_group(name: str) -> str | None:
    if name.startswith("loraforge:optimizer") or name.startswith("Optimizer."):
        return "optimizer"
    if name.startswith("loraforge:data"):
        return "data"
    if any(a in name for a in _ATTENTION) or "ScaledDotProduct" in name:
        return "attention"
    if name in _MATMUL:
        return "matmul"
    return None


def breakdown(events) -> tuple[float, dict[str, float]]:
    """(profiled wall seconds, {group: share}) from `profiler.events()` of a scheduled profile.

    The wall time is the sum of the `ProfilerStep` ranges (one per optimizer step)."""
    steps = [e for e in events if e.name.startswith("ProfilerStep")]
    wall_us = sum(e.cpu_time_total for e in steps)
    seconds: dict[str, float] = defaultdict(float)
    for e in events:
        if e.name.startswith("ProfilerStep"):
            continue
        group, parent = _own_group(e.name), e.cpu_parent
        while parent is not None:  # the outermost named range wins: a matmul inside attention is attention
            group = _own_group(parent.name) or group
            parent = parent.cpu_parent
        if group is None:
            group = "elementwise" if e.name.startswith("aten::") else "Python-other"
        seconds[group] += e.self_cpu_time_total
    accounted = sum(v for g, v in seconds.items() if g != "Python-other")
    seconds["Python-other"] = max(wall_us - accounted, 0.0)
    return wall_us / 1e6, {g: seconds[g] / wall_us if wall_us else float("nan") for g in GROUPS}


def format_breakdown(wall_s: float, steps: int, shares: dict[str, float], matmul_tflops: float | None = None) -> str:
    parts = "  ".join(f"{g} {shares[g]:.0%}" for g in GROUPS)
    line = f"{steps} profiled steps, {wall_s / max(steps, 1):.2f} s/step: {parts}"
    if matmul_tflops is not None:
        line += f"\n  the matmuls themselves ran at {matmul_tflops:.2f} TFLOP/s"
    return line
