"""The named setup steps of the recipe in loop.py: precision, run dir, data, model, step plan, final save."""

from __future__ import annotations

import json
import math
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch

from loraforge.config import RunConfig, TaskType
from loraforge.errors import ConfigError, Problem
from loraforge.train.attention import VARLEN, attention_for, register_varlen_attention
from loraforge.train.checkpoint import STATE_FILE, TrainState, clean_partial, latest_checkpoint, list_checkpoints
from loraforge.train.loss import trained_token_count

# Model types whose attention honours per-example position_ids in a packed row (transformers builds the
# block-diagonal mask from position_ids when use_cache=False; FINDINGS trap 2). ALiBi models (bloom, falcon
# with alibi) and learned absolute positions without that path are not in the list: they are never packed.
PACKABLE_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "gemma",
                                  "gemma2", "gemma3_text", "phi3", "glm", "glm4", "olmo", "olmo2", "smollm3", "granite",
                                  "starcoder2", "cohere"})
RUN_ARTIFACTS = ("run.json", "metrics.jsonl", "loss.png", "tensorboard", "best", "adapter_config.json",
                 "adapter_model.safetensors", "config.yaml")


def resolve_precision(precision: str) -> str:
    """`auto` → bf16 where the hardware does it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX), fp16 on
    older GPUs, else fp32. On a CPU without bf16 instructions autocast is emulated and slower than fp32."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    cpu = torch.backends.cpu
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "bf16" if native and cpu.get_cpu_capability() else "fp32"


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
    run_dir = Path(cfg.output_dir)
    if is_main:
        clean_partial(run_dir)
    if cfg.resume_from_checkpoint:
        if cfg.resume_from_checkpoint == "latest":
            ckpt = latest_checkpoint(run_dir)
            if ckpt is None:
                raise ConfigError([Problem("resume_from_checkpoint", f"no complete checkpoint in {run_dir}",
                                           value="latest", fix="remove resume_from_checkpoint to start a new run")])
        else:
            ckpt = Path(cfg.resume_from_checkpoint)
            if not all((ckpt / f).is_file() for f in required):
                found = ", ".join(p.name for p in list_checkpoints(run_dir)) or "none"
                raise ConfigError([Problem("resume_from_checkpoint", f"not a complete {kind} checkpoint",
                                           value=str(ckpt), allowed=f"`latest` or one of: {found}")])
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
    """Data-side state the loop needs: examples, how micro-batches are collated and counted."""

    cfg: RunConfig
    model_dir: Path
    tokenizer: Any
    data: Any  # loraforge.data.dataset.DataBundle
    batching: str
    val_groups: list = field(default_factory=list)

    def examples(self, val: bool = False):
        return self.data.val if val else self.data.train

    def collate(self, micro_batch, val: bool = False) -> dict[str, torch.Tensor]:
        if self.cfg.task_type is not TaskType.CAUSAL_LM:
            from loraforge.data.tasks import collate_task

            return collate_task(self.examples(val), micro_batch, self.tokenizer.pad_token_id, self.cfg.task_type)
        from loraforge.data.batching import collate

        return collate(self.examples(val), micro_batch, self.tokenizer.pad_token_id)

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
        return [e.num_targets if hasattr(e, "num_targets") else trained_token_count(e.labels) for e in self.examples(val)]

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
    from loraforge.data.batching import make_batches
    from loraforge.data.checks import format_stats
    from loraforge.data.dataset import build_datasets
    from loraforge.models.gguf import resolve_model_path
    from loraforge.models.loader import load_tokenizer

    model_dir = resolve_model_path(cfg.base_model)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=cfg.trust_remote_code)
    if cfg.task_type is TaskType.CAUSAL_LM:
        data = build_datasets(cfg, tokenizer)
    else:
        from loraforge.data.tasks import build_task_datasets

        data = build_task_datasets(cfg, tokenizer)
    say(format_stats(data.stats))
    setup = Setup(cfg, model_dir, tokenizer, data, batching=choose_batching(cfg, model_dir))
    if data.val:
        lengths = [len(e.input_ids) for e in data.val]
        setup.val_groups = make_batches(lengths, cfg.batch_size, "padded", seed=cfg.seed, epoch=0,
                                        row_len=cfg.cutoff_len, shuffle=False)
    return setup


def choose_batching(cfg: RunConfig, model_dir: Path) -> str:
    """auto → packed for causal LMs whose attention honours packed position_ids, else padded."""
    from loraforge.models.discovery import load_hf_config

    model_type = getattr(load_hf_config(model_dir, cfg.trust_remote_code), "model_type", "")
    packable = (cfg.task_type is TaskType.CAUSAL_LM and model_type in PACKABLE_MODEL_TYPES
                and cfg.method not in ("prefix", "ptuning", "prompt"))
    if cfg.batching == "auto":
        return "packed" if packable else "padded"
    if cfg.batching == "packed" and not packable:
        raise ConfigError([Problem("batching", f"packing is not safe for model type `{model_type}` with method "
                                   f"`{cfg.method}`: attention could cross example boundaries", value="packed",
                                   allowed="padded, grouped", fix="use `batching: grouped`")])
    return cfg.batching


def build_model(cfg: RunConfig, model_dir: Path, tokenizer, say: Callable[[str], None], data=None):
    """Load the base, apply the method, verify what trains. Returns (model, loss module, trainable report)."""
    import importlib

    from loraforge.methods import METHODS, apply_method
    from loraforge.methods.report import trainable_report, verify_trainable
    from loraforge.models.loader import load_model
    from loraforge.train.loss import CausalLMLoss, SeqLoss

    # A method may need extra load arguments (QLoRA: the bitsandbytes quantization config; native P-tuning v2:
    # pre_seq_len); a classification run needs its label list for the head.
    method_module = importlib.import_module(f"loraforge.methods.{METHODS[cfg.method]}")
    extra = method_module.load_kwargs(cfg) if hasattr(method_module, "load_kwargs") else {}
    id2label = getattr(data, "id2label", None)
    if id2label:
        extra.update(num_labels=len(id2label), id2label=id2label)
    model = load_model(model_dir, cfg.task_type, dtype=cfg.torch_dtype, attn_implementation=cfg.attn_implementation,
                       trust_remote_code=cfg.trust_remote_code, **extra)
    model.config.use_cache = False  # packed rows need it off (FINDINGS trap 2); training never uses the cache
    attention = attention_for(cfg.attn_implementation, choose_batching(cfg, model_dir))
    if attention == VARLEN:
        # packed rows: attention per example (Σ L² work) instead of one masked T² block over the whole row
        model.set_attn_implementation(register_varlen_attention())
    model = apply_method(model, cfg)
    if cfg.method == "lora" and cfg.fused_lora_dropout:
        from loraforge.methods.lora_dropout import fuse_lora_dropout

        fuse_lora_dropout(model)  # PEFT's math, without keeping each layer's dropped-out input
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(cfg.precision))
    if cfg.method == "lora" and not cfg.use_dora and compute_dtype is not None:
        cast_frozen_linears(model, compute_dtype)
        keep_lora_input_dtype(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    report = trainable_report(model)
    problems = verify_trainable(report, cfg)
    if problems:
        raise ConfigError(problems, title="the built model does not train what the config asks for")
    say(report.table())
    if cfg.task_type is TaskType.CAUSAL_LM:
        loss = CausalLMLoss(model, chunked=cfg.chunked_loss)
    elif cfg.task_type is TaskType.FEATURE_EXTRACTION:
        from loraforge.data.tasks import ContrastiveLoss

        loss = ContrastiveLoss(model)
    else:
        loss = SeqLoss(model)
    if cfg.torch_compile:
        compiled = compile_in_place(loss)
        say(f"torch.compile: {type(compiled).__name__} (compiled on its first steps; each new shape recompiles)")
    return model, loss, report


def compile_in_place(loss: torch.nn.Module) -> torch.nn.Module:
    """`torch.compile` the module the loss really calls, in place; returns it.

    In place (`Module.compile`), not `torch.compile(model)`: a wrapper would prefix every state-dict key with
    `_orig_mod.`, and the fused LM-head loss never calls the model's own forward: it calls the backbone and
    the head separately, so compiling the whole model would silently compile nothing.
    """
    from loraforge.train.loss import CausalLMLoss

    split = loss.backbone_and_head() if isinstance(loss, CausalLMLoss) else None
    target = split[0] if split is not None else loss.model
    target.compile()
    return target


def cast_frozen_linears(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store frozen linear weights (and biases) in the autocast dtype; returns how many layers were cast.

    Autocast casts a frozen fp32 weight at every use (its cast cache holds only leaves that require grad), so
    this gives the very same matmuls without the per-step casts (measured: 3.5% faster SmolLM2 LoRA steps on
    CPU). Only for adapter training: the base weights are never saved. Weights shared with an embedding (a tied
    LM head) stay fp32, since the embedding output starts the fp32 residual stream.
    """
    embedding_params = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    cast = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear or module.weight.requires_grad or id(module.weight) in embedding_params \
                or (module.bias is not None and module.bias.requires_grad):
            continue
        module.weight.data = module.weight.data.to(dtype)
        if module.bias is not None:
            module.bias.data = module.bias.data.to(dtype)
        cast += 1
    return cast


def keep_lora_input_dtype(model: torch.nn.Module) -> int:
    """Let LoRA layers take their input in the dtype it arrives in (for training under autocast only).

    PEFT casts a LoRA layer's input to the adapter weights' dtype (fp32) before `lora_A`; under autocast the
    matmul casts it straight back, so a bf16 input (o_proj's, down_proj's) makes two full-size copies forward,
    two more backward, and autograd keeps the fp32 copy. bf16 → fp32 → bf16 is exact: same numbers, fewer
    passes over memory. Only layers whose dropout is identity (p = 0, or fused into DropoutLinear): PEFT's own
    dropout would draw a different mask for a bf16 tensor. Returns how many layers were changed.
    """
    from peft.tuners.lora import LoraLayer

    changed = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and all(isinstance(d, torch.nn.Identity) for d in module.lora_dropout.values()):
            module.cast_input_dtype_enabled = False
            changed += 1
    return changed


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

    def signature(self) -> dict:
        """Everything that decides which examples make optimizer step k: a resumed run must agree on all of it."""
        return {"train_examples": len(self.lengths), "seed": self.cfg.seed, "batching": self.batching,
                "batch_size": self.cfg.batch_size,
                "micro_batches_per_step": self.cfg.gradient_accumulation_steps * self.world_size}

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
    plan = StepPlan(cfg, tuple(len(e.input_ids) for e in setup.data.train), setup.batching, world_size)
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


def save_final(cfg: RunConfig, run_dir: Path, save_model: Callable[[Path], None], state: TrainState, setup: Setup) -> None:
    """output_dir itself becomes the adapter (or full model): the best one when keep_best_checkpoint is on."""
    best = run_dir / "best"
    if cfg.keep_best_checkpoint and best.is_dir():
        for f in best.iterdir():
            shutil.copy2(f, run_dir / f.name)
    else:
        save_model(run_dir)


def write_run_json(cfg: RunConfig, run_dir: Path, state: TrainState, setup: Setup, report, **extra: Any) -> None:
    import accelerate
    import peft
    import transformers

    import loraforge

    info = {
        "status": "finished",
        "loraforge": loraforge.__version__,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     "accelerate": accelerate.__version__},
        "git_sha": _git_sha(),
        "base_model": cfg.base_model,
        "model_dir": str(setup.model_dir),
        "method": cfg.method,
        "task_type": cfg.task_type.value,
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
    (run_dir / "run.json").write_text(json.dumps(info, indent=1, default=str))


def _jsonable(obj: Any) -> Any:
    from dataclasses import asdict, is_dataclass

    return asdict(obj) if is_dataclass(obj) else obj


def _git_sha() -> str | None:
    try:
        # the code's version, not that of whatever directory the run was started from
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
