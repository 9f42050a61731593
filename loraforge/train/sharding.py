"""FSDP2 model sharding: torch's `fully_shard` on every decoder layer and on the loss module, one code path on
CPU (gloo) and GPU (nccl).

Why loraforge calls `fully_shard` itself instead of letting accelerate's FSDP plugin do it: accelerate 1.15
turns FSDP on only for an accelerator device type (`AcceleratorState` switches MULTI_GPU/NPU/XPU… to FSDP,
never MULTI_CPU), so on a CPU-only machine an FSDP config silently runs DDP (measured). Sharding in one place
means the code the CPU tests run is the code a GPU run uses. accelerate still starts the processes (its
launcher is torchrun), initializes the process group and does the reductions; torch does the sharding and the
consolidated state dicts (`torch.distributed.checkpoint.state_dict`). Nothing here is a distributed layer.

FSDP2 is asked for by an accelerate config with `distributed_type: FSDP` and `fsdp_version: 2` (accelerate
launch exports ACCELERATE_USE_FSDP / FSDP_VERSION / FSDP_RESHARD_AFTER_FORWARD), or by `sharding: fsdp2` in
the loraforge config (plain torchrun). Checkpoints are consolidated (see `ModelSaver` and `optimizer_state`):
a checkpoint of an N-process FSDP run is an ordinary adapter / model folder plus a full optimizer state keyed by
parameter name, so it resumes exactly on any number of processes, with or without FSDP.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraforge.errors import ConfigError, Problem

# What FSDP2 refuses lives in a torch-free module so that preflight can ask it too.
from loraforge.train.sharding_checks import FSDP_METHODS, fsdp_problems  # noqa: E402


@dataclass
class Sharding:
    """How the model is split over the processes: `ddp` (each process holds all of it) or `fsdp2`."""

    strategy: str = "ddp"
    reshard_after_forward: bool = True
    source: str = ""  # what asked for FSDP2 (named in errors)

    @property
    def fsdp(self) -> bool:
        return self.strategy == "fsdp2"


def sharding_for(cfg) -> Sharding:
    """The strategy the launch and the config ask for.

    Raises:
        ConfigError: FSDP version 1, or a method / option that FSDP2 cannot run here.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and not torch.cuda.is_available():
        # measured (accelerate 1.15, deepspeed 0.19.8, whose CPU accelerator itself loads with gloo): with cpu=True
        # accelerate ignores DeepSpeed and runs DDP; with cpu=False it finds no backend and each process trains
        # alone (num_processes 1). Neither is ZeRO, so refuse instead of running something else.
        raise ConfigError([Problem("distributed_type", "DeepSpeed through accelerate needs CUDA GPUs: on a CPU-only "
                                   "machine accelerate would silently run DDP (or independent single processes)",
                                   value="DEEPSPEED", allowed="FSDP (configs/accelerate/fsdp2.yaml), MULTI_GPU",
                                   fix="shard on CPU with configs/accelerate/fsdp2.yaml (FSDP2 ≈ ZeRO-3)")])
    env_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not env_fsdp and getattr(cfg, "sharding", "ddp") != "fsdp2":
        return Sharding()
    source = "the accelerate config (distributed_type: FSDP)" if env_fsdp else "sharding: fsdp2"
    if env_fsdp and os.environ.get("FSDP_VERSION", "1") != "2":
        raise ConfigError([Problem("fsdp_version", "loraforge shards with FSDP2 only",
                                   value=os.environ.get("FSDP_VERSION", "1"), allowed="2",
                                   fix="set `fsdp_config: {fsdp_version: 2}` in the accelerate config "
                                       "(configs/accelerate/fsdp2.yaml)")])
    for key, fix in (("FSDP_OFFLOAD_PARAMS", "set fsdp_offload_params: false (CPU offload is not supported)"),
                     ("FSDP_ACTIVATION_CHECKPOINTING", "set fsdp_activation_checkpointing: false and use "
                                                      "`gradient_checkpointing: true` in the loraforge config")):
        if env_fsdp and os.environ.get(key, "false").lower() == "true":
            raise ConfigError([Problem(key.lower(), "not supported by loraforge's FSDP2 sharding", value="true",
                                       allowed="false", fix=fix)])
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "no_shard", "shard_grad_op")
    sharding = Sharding("fsdp2", reshard_after_forward=reshard, source=source)
    problems = fsdp_problems(cfg)
    if problems:
        raise ConfigError(problems, title=f"FSDP2 ({source}) cannot run this config")
    return sharding


@contextlib.contextmanager
def accelerate_without_fsdp(sharding: Sharding):
    """Build accelerate's state with FSDP hidden from it: loraforge shards, accelerate must not wrap again."""
    if not sharding.fsdp or "ACCELERATE_USE_FSDP" not in os.environ:
        yield
        return
    saved = os.environ.pop("ACCELERATE_USE_FSDP")
    try:
        yield
    finally:
        os.environ["ACCELERATE_USE_FSDP"] = saved


def shard(loss_model: torch.nn.Module, model: torch.nn.Module, sharding: Sharding, device: torch.device) -> str:
    """`fully_shard` each decoder layer (the model's `_no_split_modules`), then the loss module as the root, so
    the embeddings, final norm and LM head (which the fused loss calls directly) are gathered for its forward.
    Returns a line saying how much of the model this process holds."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = torch.distributed.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer_names = set(getattr(base, "_no_split_modules", None) or [])
    if not layer_names:
        raise ConfigError([Problem("sharding", f"{type(base).__name__} names no decoder layer class "
                                   "(_no_split_modules) to shard", value="fsdp2", fix="use DDP for this model")])
    layers = [m for m in loss_model.modules() if type(m).__name__ in layer_names]
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=sharding.reshard_after_forward)
    fully_shard(loss_model, mesh=mesh, reshard_after_forward=sharding.reshard_after_forward)
    total = sum(p.numel() for p in model.parameters())
    local = sum(_local(p).numel() for p in model.parameters())
    return (f"FSDP2: {len(layers)} layers + root sharded over {world} processes; this process holds "
            f"{local:,} of {total:,} parameter values ({100 * local / max(total, 1):.1f}%)")


def return_freed_buffers_to_the_os() -> bool:
    """Fix glibc malloc's mmap threshold at 4 MiB for an FSDP2 run on CPU; True if applied.

    FSDP2 allocates and frees one unsharded copy of each layer's weights (all-gather) and gradients
    (reduce-scatter) per layer per step. glibc raises its mmap threshold to the largest block freed so far (up
    to 32 MiB), so these buffers, a layer's size, soon come from the heap, where the gloo threads' arenas
    fragment and keep them: measured on SmolLM2-135M full fine-tuning over 2 processes, the per-process peak
    RSS was 2.9-3.2 GiB with glibc's default (more than one process without sharding, 2.8 GiB) and 1.9 GiB
    with the threshold fixed (benchmarks/fsdp_memory.py, BENCHMARKS.md). Setting the threshold explicitly turns
    glibc's adjustment off, so blocks above it are mmapped and returned when freed. Linux/glibc only.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl or another libc
        return False
    m_mmap_threshold = -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 4 * 2**20))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def full_tensor(t: Any) -> Any:
    """A DTensor's full value (collective); anything else unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class ModelSaver:
    """Writes the adapter (or full model) the way a one-process run does: `save_pretrained`, on rank 0 alone.

    Under FSDP2 the weights must first be gathered on every process (`gather`, a collective that all ranks
    call before rank 0 saves): an adapter gathers only its trainable tensors, a full/freeze model its whole
    state dict (torch's `get_model_state_dict`, full and offloaded to rank 0's CPU)."""

    def __init__(self, accelerator, model: torch.nn.Module, sharding: Sharding):
        self.accelerator, self.model, self.sharding = accelerator, model, sharding
        self._state: dict | None = None

    def gather(self) -> None:
        if not self.sharding.fsdp:
            return
        main = self.accelerator.is_main_process
        if hasattr(self.model, "peft_config"):
            state = {}
            for name, p in self.model.named_parameters():  # same order on every rank
                if p.requires_grad:
                    value = full_tensor(p.detach())
                    if main:
                        state[name] = value.cpu().clone()
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        self._state = state if main else None

    def __call__(self, path: Path) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if self.sharding.fsdp:
            if self._state is None:
                raise RuntimeError("ModelSaver.gather() must run on every process before rank 0 saves")
            model.save_pretrained(path, state_dict=self._state, safe_serialization=True)
        else:
            model.save_pretrained(path, safe_serialization=True)


def optimizer_state(loss_model: torch.nn.Module, optimizer, sharding: Sharding) -> dict | None:
    """Under FSDP2: the consolidated optimizer state keyed by parameter name (collective; rank 0 gets it).
    None otherwise (the checkpoint then saves `optimizer.state_dict()` as before)."""
    if not sharding.fsdp:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(loss_model, _inner(optimizer),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(loss_model: torch.nn.Module, optimizer, saved: dict, sharding: Sharding) -> None:
    """Restore a checkpoint's optimizer state on any number of processes.

    A name-keyed (consolidated FSDP2) state goes through torch's `set_optimizer_state_dict`, which shards it
    again for this run; an index-keyed one (`optimizer.state_dict()` of a DDP / one-process run) is loaded as
    is, or renamed to parameter names first when this run shards."""
    state_keys = list(saved.get("state", {}))
    by_name = bool(state_keys) and isinstance(state_keys[0], str) or any(
        isinstance(p, str) for g in saved.get("param_groups", []) for p in g.get("params", []))
    if not by_name and not sharding.fsdp:
        optimizer.load_state_dict(saved)
        return
    inner = _inner(optimizer)
    if not by_name:
        saved = _index_to_names(loss_model, inner, saved)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(loss_model, inner, saved, options=StateDictOptions(full_state_dict=True))


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def _index_to_names(loss_model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> dict:
    names = {id(p): n for n, p in loss_model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    state = {order[i]: v for i, v in saved["state"].items()}
    groups = [dict(g, params=[order[i] for i in g["params"]]) for g in saved["param_groups"]]
    return {"state": state, "param_groups": groups}


__all__ = ["FSDP_METHODS", "ModelSaver", "Sharding", "accelerate_without_fsdp", "fsdp_problems", "full_tensor",
           "load_optimizer_state", "optimizer_state", "return_freed_buffers_to_the_os", "shard", "sharding_for"]
