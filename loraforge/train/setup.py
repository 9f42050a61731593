"""The named setup steps of the recipe in loop.py: precision, run dir, data and the step plan, final save.

The model side (base → method → training steps → loss module) is `train/model.py`; which data, collation, target
count and loss a run uses is its objective's (`loraforge/objectives/`).
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch

from loraforge.config import RunConfig
from loraforge.data.batching import choose_batching
from loraforge.errors import ConfigError, Problem
from loraforge.train.attention import attention_for
from loraforge.train.checkpoint import STATE_FILE, TrainState, clean_partial, list_checkpoints
from loraforge.train.model import build_model
from loraforge.train.precision import resolve_precision
from loraforge.train.manifest import require_intact, resumable_checkpoint
from loraforge.train.rundir import RUN_ARTIFACTS
from loraforge.train.runinfo import run_header
from loraforge.train.runinfo import write_run_json as write_info

# What the recipe (loop.py), the image recipe, the benchmarks and tests import from here; `build_model`,
# `choose_batching`, `resolve_precision` and `RUN_ARTIFACTS` live in the modules imported above.
__all__ = ["RUN_ARTIFACTS", "Setup", "StepPlan", "build_accelerator", "build_data", "build_model", "choose_batching",
           "prepare_run_dir", "resolve_precision", "save_final", "step_plan", "tune_cpu_malloc", "write_run_json"]


def tune_cpu_malloc() -> bool:
    """Raise glibc malloc's mmap and trim thresholds so freed tensor memory is reused; True if applied.

    PyTorch has no caching allocator for CPU tensors: every activation is a malloc, and glibc returns large
    freed blocks to the kernel, so each step page-faults its activations in again (measured on SmolLM2 LoRA,
    4 × 512 tokens, one thread: 12 s of 74 in the kernel, most of it the 200 MB logits of 1,024-token LM-head
    chunks). With blocks up to 1 GiB served from the heap and up to 2 GiB of free heap kept, that step was 13%
    faster. With 128-token chunks (the default since) the gain is within noise and peak RSS grows ~2%, so it is
    opt-in (see BENCHMARKS.md). Process-wide, like the `jemalloc` preloading CPU training guides recommend;
    Linux with glibc only, a no-op elsewhere.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl or another libc
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_trim_threshold, 2**31 - 1)) and bool(mallopt(m_mmap_threshold, 2**30))


def build_accelerator(precision: str):
    from accelerate import Accelerator

    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    if mixed == "fp16" and not torch.cuda.is_available():
        raise ConfigError([Problem("precision", "fp16 mixed precision needs a CUDA GPU", value="fp16",
                                   allowed="auto, fp32, bf16", fix="use `precision: bf16` (or auto) on CPU")])
    # AcceleratorState is a process-wide singleton that refuses a second, different mixed_precision: forget the
    # previous run's settings so train() can be called again in one process (sweeps, notebooks, tests). The
    # PartialState (device, process group of `accelerate launch`) is kept.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    if not torch.cuda.is_available():
        # accelerate imports DeepSpeed when installed; without a GPU DeepSpeed then logs "Setting accelerator to
        # CPU. If you have GPU ... we were unable to detect it." — noise in a CPU run (issue 14). Naming the CPU
        # accelerator up front is what that message asks for; a user's own DS_ACCELERATOR is kept.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Accumulation is done by the loop itself (token-normalized), so accelerate's own is left at 1.
    return Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())


def prepare_run_dir(cfg: RunConfig, *, is_main: bool, artifacts: tuple[str, ...] = RUN_ARTIFACTS,
                    required: tuple[str, ...] = (STATE_FILE,), kind: str = "loraforge") -> tuple[Path, Path | None]:
    """The run dir, and the checkpoint to resume from (None for a fresh run).

    Args:
        artifacts: the files a finished run leaves in the run dir (removed when overwriting).
        required: the files a checkpoint dir must hold to be resumable.
        kind: names the checkpoint in errors (the image recipe passes its own files and name).

    Raises:
        ConfigError: resuming without a checkpoint, or starting over a previous run without overwrite.
    """
    from loraforge.models.fit import checkpoint_fit_problems
    from loraforge.models.gguf import resolve_model_path

    run_dir = Path(cfg.output_dir)
    if is_main:
        clean_partial(run_dir)
    if cfg.resume_from_checkpoint:
        if cfg.resume_from_checkpoint == "latest":
            ckpt = resumable_checkpoint(run_dir, None if is_main else (lambda _m: None))  # every rank: the same one
            if ckpt is None:
                raise ConfigError([Problem("resume_from_checkpoint", f"no complete checkpoint in {run_dir}",
                                           value="latest", fix="remove resume_from_checkpoint to start a new run")])
        else:
            ckpt = Path(cfg.resume_from_checkpoint)
            if not all((ckpt / f).is_file() for f in required):
                found = ", ".join(p.name for p in list_checkpoints(run_dir)) or "none"
                raise ConfigError([Problem("resume_from_checkpoint", f"not a complete {kind} checkpoint",
                                           value=str(ckpt), allowed=f"`latest` or one of: {found}")])
            require_intact(ckpt)
        fit = checkpoint_fit_problems(ckpt, resolve_model_path(cfg.base_model))
        if fit:
            raise ConfigError(fit, title="cannot resume from this checkpoint")
        run_dir.mkdir(parents=True, exist_ok=True)  # the checkpoint may belong to another run's output_dir
        return run_dir, ckpt
    previous = [a for a in artifacts if (run_dir / a).exists()] + [p.name for p in list_checkpoints(run_dir)]
    if previous and not cfg.overwrite_output_dir:
        raise ConfigError([Problem("output_dir", "already holds a training run", value=str(run_dir),
                                   fix="continue it with `resume_from_checkpoint: latest`, start over with "
                                       "`overwrite_output_dir: true`, or pick another output_dir")])
    if previous and is_main:
        for p in [run_dir / a for a in artifacts] + list_checkpoints(run_dir):
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, None


@dataclass
class Setup:
    """Data-side state the loop needs: examples, and how the objective collates and counts micro-batches."""

    cfg: RunConfig
    model_dir: Path
    tokenizer: Any
    data: Any  # the objective's bundle: .train, .val, .stats (a dataset.DataBundle or tasks.TaskDataBundle)
    batching: str
    objective: Any = None  # loraforge.objectives.Objective; None: the config's own (objective_for)
    val_groups: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.objective is None:
            from loraforge.objectives import objective_for

            self.objective = objective_for(self.cfg)

    def examples(self, val: bool = False):
        return self.data.val if val else self.data.train

    def collate(self, micro_batch, val: bool = False) -> dict[str, torch.Tensor]:
        return self.objective.collate(self.examples(val), micro_batch, self.tokenizer.pad_token_id, self.cfg)

    def feed(self, groups: list[list], *, start: int, rank: int, world_size: int):
        """Yields (group, this process's collated micro-batches) for each optimizer step `groups[start:]`.

        With `dataloader_num_workers` > 0, worker processes collate the next micro-batches while the model
        trains on the current ones (a torch DataLoader over the fixed step plan, so the order, and exact resume,
        are unchanged)."""
        todo = groups[start:]
        mine = [g[rank::world_size] for g in todo]
        if not self.cfg.dataloader_num_workers:
            for group, micro_batches in zip(todo, mine):
                yield group, [self.collate(mb) for mb in micro_batches]
            return
        from torch.utils.data import DataLoader

        flat = [mb for micro_batches in mine for mb in micro_batches]
        batches = iter(DataLoader(_Collated(self, flat), batch_size=None, shuffle=False,
                                  num_workers=self.cfg.dataloader_num_workers))
        for group, micro_batches in zip(todo, mine):
            yield group, [next(batches) for _ in micro_batches]

    def tokens_of(self, micro_batch, val: bool = False) -> int:
        ex = self.examples(val)
        return sum(self._counts(val)[i] for row in micro_batch for i in row) if ex else 0

    @lru_cache(maxsize=2)
    def _counts(self, val: bool) -> list[int]:
        # causal LM: labelled next-token positions; other tasks: the targets their mean loss is taken over
        return [self.objective.targets(e) for e in self.examples(val)]

    def __hash__(self) -> int:  # lru_cache on a method needs a hashable self
        return id(self)

    def score_generations(self, model, cfg: RunConfig) -> dict[str, float]:
        from loraforge.train.gen_eval import score_validation_generations

        return score_validation_generations(model, self.tokenizer, self.data, cfg)


class _Collated(torch.utils.data.Dataset):
    """Micro-batch i of a fixed list, collated (what DataLoader workers compute ahead of the loop)."""

    def __init__(self, setup: Setup, micro_batches: list) -> None:
        self.setup, self.micro_batches = setup, micro_batches

    def __len__(self) -> int:
        return len(self.micro_batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.setup.collate(self.micro_batches[i])


def build_data(cfg: RunConfig, say: Callable[[str], None]) -> Setup:
    """Tokenizer, the objective's train/val examples (stats printed), the batching, and the validation batches."""
    from loraforge.data.batching import make_batches
    from loraforge.data.checks import format_stats
    from loraforge.models.gguf import resolve_model_path
    from loraforge.models.loader import load_tokenizer
    from loraforge.objectives import objective_for

    model_dir = resolve_model_path(cfg.base_model)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=cfg.trust_remote_code)
    objective = objective_for(cfg)
    data = objective.build_data(cfg, tokenizer)
    say(format_stats(data.stats))
    setup = Setup(cfg, model_dir, tokenizer, data, batching=choose_batching(cfg, model_dir), objective=objective)
    if data.val:
        lengths = [len(e.input_ids) for e in data.val]
        setup.val_groups = make_batches(lengths, cfg.batch_size, "padded", seed=cfg.seed, epoch=0,
                                        row_len=cfg.cutoff_len, shuffle=False)
    return setup


@dataclass
class StepPlan:
    """Which micro-batches make each optimizer step, epoch by epoch (deterministic: exact resume)."""

    cfg: RunConfig
    lengths: tuple[int, ...]
    batching: str
    world_size: int
    epochs: int = 0
    total_steps: int = 0
    groups_per_epoch: int = 0
    eval_steps: int | None = None

    data_sha: str = ""

    def signature(self) -> dict:
        """Everything that decides which examples make optimizer step k: a resumed run must agree on all of it."""
        return {"data": self.data_sha, "train_examples": len(self.lengths), "seed": self.cfg.seed,
                "batching": self.batching,
                "batch_size": self.cfg.batch_size,
                "micro_batches_per_step": self.cfg.gradient_accumulation_steps * self.world_size}

    def same_data(self, saved: dict) -> bool:
        """Did the checkpoint's run train on these examples? (Checkpoints from before the data fingerprint:
        judged by the example count.) Other data means continued training, not an interrupted run."""
        if saved.get("data"):
            return saved["data"] == self.data_sha
        return saved.get("train_examples") == len(self.lengths)

    def check_resume(self, saved: dict, ckpt: Path) -> None:
        """Raises:
            ConfigError: the checkpoint's run split its data differently (its step k had other examples)."""
        now = self.signature()
        problems = [Problem("resume_from_checkpoint",
                            f"the checkpoint's run had {k} = {saved[k]}, this run has {now[k]}", value=str(ckpt),
                            fix="resume with the interrupted run's data, seed, batching, batch_size and "
                                "gradient_accumulation_steps × processes, or start a new run from its weights "
                                f"with `init_adapter: {ckpt}`")
                    for k in now if k in saved and saved[k] != now[k]]
        if problems:
            raise ConfigError(problems, title="cannot resume exactly")

    def groups(self, epoch: int) -> list[list]:
        """The optimizer steps of `epoch`: all of them, except in the last epoch of a fractional `epochs`."""
        groups = self.full_epoch(epoch)
        frac = self.cfg.epochs - math.floor(self.cfg.epochs)
        if self.cfg.max_steps is None and frac and epoch == self.epochs - 1:
            groups = groups[:max(1, round(len(groups) * frac))]
        return groups

    @lru_cache(maxsize=4)
    def full_epoch(self, epoch: int) -> list[list]:
        from loraforge.data.batching import make_batches

        cfg = self.cfg
        mode = "padded" if self.batching == "packed" else self.batching
        batches = make_batches(list(self.lengths), cfg.batch_size, mode, seed=cfg.seed, epoch=epoch,
                               row_len=cfg.cutoff_len, shuffle=True)
        if self.batching == "packed":
            # Padding-free packing: the micro-batch's examples become one row (per-example position_ids), so
            # an optimizer step sees exactly the examples a padded run would, with no padding computed.
            batches = [[[i for row in b for i in row]] for b in batches]
        size = cfg.gradient_accumulation_steps * self.world_size
        groups = [batches[i:i + size] for i in range(0, len(batches), size)]
        if self.world_size > 1 and groups and len(groups[-1]) < size:
            groups = groups[:-1]  # every process must take part in every step
        return groups

    def __hash__(self) -> int:
        return id(self)


def step_plan(cfg: RunConfig, setup: Setup, world_size: int) -> StepPlan:
    plan = StepPlan(cfg, tuple(len(e.input_ids) for e in setup.data.train), setup.batching, world_size,
                    data_sha=_fingerprint(setup.data.train))
    plan.epochs = math.ceil(cfg.epochs)
    plan.groups_per_epoch = len(plan.full_epoch(0))
    if plan.groups_per_epoch == 0:
        raise ConfigError([Problem("batch_size", "not enough training examples for one optimizer step",
                                   value=cfg.batch_size, fix="add data or lower batch_size / gradient_accumulation_steps")])
    if cfg.max_steps:
        plan.epochs = math.ceil(cfg.max_steps / plan.groups_per_epoch) + 1
        plan.total_steps = cfg.max_steps
    else:
        plan.total_steps = sum(len(plan.groups(e)) for e in range(plan.epochs))
    if setup.val_groups:
        plan.eval_steps = cfg.eval_steps or cfg.save_steps or plan.total_steps
    return plan


def _fingerprint(examples) -> str:
    """A short hash of the tokenized training examples, in order: the same data gives the same value."""
    import hashlib

    h = hashlib.sha256()
    for e in examples:
        h.update(torch.as_tensor(list(e.input_ids), dtype=torch.int64).numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def save_final(cfg: RunConfig, run_dir: Path, save_model: Callable[[Path], None], state: TrainState, setup: Setup) -> None:
    """output_dir itself becomes the adapter (or full model): the best one when keep_best_checkpoint is on."""
    best = run_dir / "best"
    if cfg.keep_best_checkpoint and best.is_dir():
        for f in best.iterdir():
            shutil.copy2(f, run_dir / f.name)
    else:
        save_model(run_dir)


def write_run_json(cfg: RunConfig, run_dir: Path, state: TrainState, setup: Setup, report, **extra: Any) -> None:
    info = {
        **run_header(("torch", "transformers", "peft", "accelerate")),
        "base_model": cfg.base_model,
        "model_dir": str(setup.model_dir),
        **_conversion(setup.model_dir),
        "method": cfg.method,
        "task_type": cfg.task_type.value,
        "stage": cfg.stage,
        "objective": setup.objective.name,
        "trainable_params": report.trainable,
        "total_params": report.total,
        "trainable_percent": round(report.percent, 4),
        "global_step": state.global_step,
        "tokens_seen": state.tokens_seen,
        "best_val_loss": state.best_val_loss,
        "best_step": state.best_step,
        "batching": setup.batching,
        "attention": attention_for(cfg.attn_implementation, setup.batching),
        "data": _jsonable(setup.data.stats),
        **extra,
    }
    write_info(run_dir, info)


def _conversion(model_dir: Path) -> dict:
    """The source checkpoint and conversion of a base converted from an old remote-code layout (else {})."""
    from loraforge.models.native import import_record

    rec = import_record(model_dir)
    if rec is None:
        return {}
    return {"conversion": {k: rec.get(k) for k in ("source", "family", "variant", "native_architecture",
                                                   "converter_version", "source_key", "notes")}}


def _jsonable(obj: Any) -> Any:
    from dataclasses import asdict, is_dataclass

    return asdict(obj) if is_dataclass(obj) else obj
