"""What FSDP2 sharding refuses, with the reason: asked by preflight (`validate`), the web UI and the trainer.

Kept apart from sharding.py so that preflight can import it without torch.
"""
from __future__ import annotations

from loraforge.errors import Problem

FSDP_METHODS = ("lora", "full", "freeze")  # verified under FSDP2 (tests/test_train_fsdp.py)


def fsdp_problems(cfg) -> list[Problem]:
    """What FSDP2 refuses, with the reason (run by preflight and again when the trainer shards)."""
    from loraforge.methods import METHODS

    problems = []
    record = METHODS.get(cfg.method)
    if record is not None and record.quantizes_base:  # QLoRA
        problems.append(Problem(
            "method", "QLoRA's 4-bit base weights cannot be sharded by FSDP2 here", value="qlora",
            allowed=", ".join(FSDP_METHODS),
            fix="bitsandbytes keeps each 4-bit weight as a packed Params4bit with a separate quant_state, which "
                "fully_shard cannot split (it needs a plain tensor per parameter; the bnb_4bit_quant_storage "
                "trick is CUDA-only) and the CPU 4-bit kernels repack weights per process; use `method: lora` "
                "with FSDP2, or QLoRA with DDP (each process holds the whole 4-bit base)"))
    elif cfg.method not in FSDP_METHODS:
        problems.append(Problem("method", "not verified under FSDP2", value=cfg.method,
                                allowed=", ".join(FSDP_METHODS), fix="use DDP for this method (its weights are small)"))
    if getattr(cfg, "eval_generation_metric", None):
        problems.append(Problem("eval_generation_metric", "generation during validation runs on rank 0 alone, "
                                "but every FSDP2 forward needs all processes", value=cfg.eval_generation_metric,
                                fix="remove eval_generation_metric (the validation loss still runs) or use DDP"))
    if getattr(cfg, "torch_compile", False):
        problems.append(Problem("torch_compile", "not verified under FSDP2", value=True, fix="set torch_compile: false"))
    return problems
