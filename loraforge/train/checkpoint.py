"""Atomic, resumable checkpoints.

A checkpoint is written into `.tmp-checkpoint-N-…/` (loraforge.atomic) and renamed to `checkpoint-N/` only once
complete, so a crash or `kill -9` mid-write leaves a temp dir that is never picked up (and is cleaned on the next start).
`trainer_state.json` is written last inside the temp dir; a dir without it is not a checkpoint.

Contents: the adapter (or full model) in its normal format — so every checkpoint also loads with plain PEFT /
transformers — plus optimizer, scheduler, RNG states and the data position.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from loraforge.atomic import atomic_dir
from loraforge.train.manifest import write_manifest
from loraforge.train.space import guard_disk_space

from loraforge.train.checkpoint_files import _CKPT, STATE_FILE, list_checkpoints  # noqa: F401 (re-exported)


@dataclass
class TrainState:
    """Where the run is. `group` is the index of the next optimizer step's micro-batch group in `epoch`."""

    global_step: int = 0
    epoch: int = 0
    group: int = 0
    tokens_seen: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    world_size: int = 1
    history: list[dict] = field(default_factory=list)  # logged metrics, so a resumed run's plot is whole
    plan: dict = field(default_factory=dict)  # what fixes the data order (StepPlan.signature); must match on resume


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def clean_partial(run_dir: Path) -> None:
    """Remove what a crash mid-write left: loraforge.atomic's `.tmp-*` (and `.old-*`) siblings of checkpoints,
    `best` and run.json (called before the run writes anything, so none of them is in use)."""
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


@guard_disk_space  # checks free space first; a full disk is a clear error, not basic_ios::clear
def save_checkpoint(run_dir: Path, state: TrainState, save_model: Callable[[Path], None],
                    optimizer: torch.optim.Optimizer, scheduler, *, keep: int | None = None,
                    protect: Path | None = None, optimizer_state: dict | None = None) -> Path:
    """Write `checkpoint-<step>` atomically; then drop the oldest beyond `keep` (never `protect`).

    `optimizer_state`: what to save instead of `optimizer.state_dict()` (FSDP2: the consolidated, name-keyed
    state, gathered on every process beforehand; see train/sharding.py)."""
    final = run_dir / f"checkpoint-{state.global_step}"
    with atomic_dir(final) as tmp:
        save_model(tmp)
        torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, tmp / "rng.pt")
        np_state = np.random.get_state()
        rng = {"python": _jsonable(random.getstate()), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
        (tmp / "rng_py.json").write_text(json.dumps(rng))
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
        write_manifest(tmp)  # last: checksums of every file, so "complete" means verified (train/manifest.py)
    if keep:
        for old in list_checkpoints(run_dir)[:-keep]:
            if protect is None or old.resolve() != protect.resolve():
                shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, optimizer: torch.optim.Optimizer, scheduler,
                    load_optimizer: Callable[[dict], None] | None = None) -> TrainState:
    """Restore optimizer, scheduler and RNG states (the model weights are loaded by the caller).

    `load_optimizer`: loads the saved optimizer state instead of `optimizer.load_state_dict` (FSDP2 shards it)."""
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    (load_optimizer or optimizer.load_state_dict)(saved)
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    rng = torch.load(ckpt / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    py = json.loads((ckpt / "rng_py.json").read_text())
    random.setstate(_tupled(py["python"]))
    kind, keys, *rest = py["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    return TrainState(**json.loads((ckpt / STATE_FILE).read_text()))


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, tuple) else x


def _tupled(x):
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x
