"""The training recipe, top to bottom: seed → model → method → data → prepare → loop → save.

Multi-GPU / multi-node runs use the same code under `accelerate launch` (DDP, FSDP, DeepSpeed come from
accelerate's own config); nothing here is a home-made distributed layer. Per optimizer step, the plan yields a
group of `gradient_accumulation_steps × world_size` micro-batches; process r takes every world_size-th one, so
the result equals a single-process run with the same global batch.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from loraforge.config import RunConfig, save_config
from loraforge.errors import ConfigError, LoraforgeError, Problem
from loraforge.train.checkpoint import (TrainState, clean_partial, latest_checkpoint, list_checkpoints, load_checkpoint,
                                        save_checkpoint)
from loraforge.train.lock import holds_output_dir
from loraforge.train.logging import RunLogger, plot_loss


class TrainingInterrupted(Exception):
    """Ctrl-C / SIGTERM: a checkpoint was written; `.checkpoint` says where."""

    def __init__(self, checkpoint: Path | None, signum: int, is_main: bool = True):
        self.checkpoint, self.signum, self.is_main = checkpoint, signum, is_main
        super().__init__(f"interrupted by signal {signum}")


class TrainingDiverged(LoraforgeError):
    title = "training stopped"


@dataclass
class TrainResult:
    run_dir: Path
    global_step: int
    final_loss: float | None
    best_val_loss: float | None
    stopped_early: bool
    is_main: bool = True  # False on the other ranks of `accelerate launch`: callers print only where it is True


@holds_output_dir  # not a model folder, and one run per output_dir
def train(cfg: RunConfig, *, echo: Callable[[str], None] = print) -> TrainResult:
    """Fine-tune as `cfg` says and write the run dir (see docs/ARCHITECTURE.md for its contract)."""
    from loraforge.train.setup import (build_accelerator, build_data, build_model, prepare_run_dir,
                                       resolve_precision, save_final, step_plan, tune_cpu_malloc, write_run_json)
    from loraforge.train.optim import build_optimizer, build_scheduler

    t_start = time.time()
    precision = resolve_precision(cfg.precision)
    accelerator = build_accelerator(precision)
    malloc_tuned = cfg.tune_cpu_malloc and accelerator.device.type == "cpu" and tune_cpu_malloc()
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    main = accelerator.is_main_process
    say = echo if main else (lambda _msg: None)
    run_dir, resume_from = prepare_run_dir(cfg, is_main=main)
    # Every process has checked the run dir before the main one writes anything into it (else a slower rank
    # could mistake this run's fresh files for a previous run), and the main one has finished cleaning it.
    accelerator.wait_for_everyone()

    # Model and data. Data is built first: a bad line is reported before any weights are loaded.
    setup = build_data(cfg, say)
    model, loss_model, report = build_model(cfg, setup.model_dir, setup.tokenizer, say, setup.data)
    say(report.line())

    plan = step_plan(cfg, setup, accelerator.num_processes)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, plan.total_steps)
    loss_model, optimizer = accelerator.prepare(loss_model, optimizer)

    state = TrainState(world_size=accelerator.num_processes, plan=plan.signature())
    if resume_from is not None:
        _load_weights(model, resume_from)
        state = load_checkpoint(resume_from, optimizer, scheduler)
        plan.check_resume(state.plan, resume_from)
        state.world_size, state.plan = accelerator.num_processes, plan.signature()
        say(f"resumed from {resume_from} at step {state.global_step}")
    if main:
        save_config(cfg.model_copy(update={"precision": precision}), run_dir / "config.yaml")
        setup.tokenizer.save_pretrained(run_dir)
    say(f"{len(setup.data.train)} training examples, {plan.total_steps} optimizer steps "
        f"({plan.groups_per_epoch} per epoch, {precision}, batching={setup.batching}"
        f"{f', {accelerator.num_processes} processes' if accelerator.num_processes > 1 else ''})")

    logger = RunLogger(run_dir, total_steps=plan.total_steps, start_step=state.global_step, enabled=main,
                       tensorboard="tensorboard" in cfg.report_to, append=resume_from is not None)
    save_model = _model_saver(accelerator, model, cfg)
    ckpt_args = dict(keep=cfg.save_total_limit)

    def checkpoint_now() -> Path | None:
        accelerator.wait_for_everyone()
        path = None
        if main:
            best = run_dir / f"checkpoint-{state.best_step}" if state.best_step else None
            path = save_checkpoint(run_dir, state, save_model, optimizer, scheduler, protect=best, **ckpt_args)
        accelerator.wait_for_everyone()
        return path

    stop_signal: list[int] = []
    stopped_early = False
    last_loss: float | None = None
    t_first_step: float | None = None
    window = {"loss": 0.0, "tokens": 0, "t": time.time()}
    with _catch_signals(stop_signal):
        loss_model.train()
        while state.epoch < plan.epochs and state.global_step < plan.total_steps:
            feed = setup.feed(plan.groups(state.epoch), start=state.group, rank=accelerator.process_index,
                              world_size=accelerator.num_processes)
            for group, mine in feed:
                if state.global_step >= plan.total_steps:
                    break
                # ---- one optimizer step: forward/backward every micro-batch of this process ----
                step_tokens = sum(setup.tokens_of(mb) for mb in group)  # all processes: the true denominator
                loss_sum = torch.zeros((), device=accelerator.device)
                for k, batch in enumerate(mine):
                    batch = {key: v.to(accelerator.device) for key, v in batch.items()}
                    sync = contextlib.nullcontext() if k == len(mine) - 1 else accelerator.no_sync(loss_model)
                    with sync, accelerator.autocast():
                        s, _ = loss_model(**batch)
                        # × world size because DDP averages gradients over processes.
                        accelerator.backward(s / step_tokens * accelerator.num_processes)
                    loss_sum += s.detach().float()
                loss_sum = accelerator.reduce(loss_sum, "sum") if accelerator.num_processes > 1 else loss_sum
                step_loss = loss_sum.item() / max(step_tokens, 1)
                if not math.isfinite(step_loss):
                    logger.close()
                    raise _diverged(cfg, state, run_dir, f"loss is {step_loss}")
                # max_grad_norm null: no clipping, but the norm is still measured and logged
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
                grad_norm = None if grad_norm is None else float(grad_norm)  # None: DeepSpeed clips in its engine
                # A finite loss can still give inf/nan gradients (weights already huge); stepping on them would put
                # NaN weights into the next checkpoint. fp16's loss scaler skips such steps itself.
                if precision != "fp16" and grad_norm is not None and not math.isfinite(grad_norm):
                    logger.close()
                    raise _diverged(cfg, state, run_dir, f"gradient norm is {grad_norm} (loss {step_loss:.4g})")
                lr = scheduler.get_last_lr()[0]  # the rate this step used (read before the scheduler advances)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                # ---- bookkeeping ----
                state.global_step += 1
                state.group += 1
                state.tokens_seen += step_tokens
                t_first_step = t_first_step or time.time() - t_start
                window["loss"] += loss_sum.item()
                window["tokens"] += step_tokens
                last_loss = step_loss
                logger.progress(1, loss=step_loss, lr=lr, tok_s=window["tokens"] / max(time.time() - window["t"], 1e-9))
                if state.global_step % cfg.logging_steps == 0 or state.global_step == plan.total_steps:
                    # epochs in units of a full pass, also inside a fractional last epoch
                    epoch = round(state.epoch + state.group / plan.groups_per_epoch, 4)
                    record = {"step": state.global_step, "epoch": epoch,
                              "loss": window["loss"] / max(window["tokens"], 1), "lr": lr,
                              "grad_norm": grad_norm,
                              "tokens": state.tokens_seen,
                              "tokens_per_s": window["tokens"] / max(time.time() - window["t"], 1e-9)}
                    logger.log(record)
                    state.history.append({"step": record["step"], "loss": record["loss"]})
                    window = {"loss": 0.0, "tokens": 0, "t": time.time()}
                if setup.val_groups and _due(state.global_step, plan.eval_steps, plan.total_steps):
                    stopped_early = _evaluate(cfg, state, setup, loss_model, accelerator, logger, run_dir, save_model)
                if cfg.save_steps and state.global_step % cfg.save_steps == 0:
                    checkpoint_now()
                if _stop_requested(stop_signal, accelerator):
                    path = checkpoint_now()
                    logger.close()
                    raise TrainingInterrupted(path, stop_signal[0] if stop_signal else signal.SIGTERM, is_main=main)
                if stopped_early:
                    break
            if stopped_early:
                break
            state.epoch += 1
            state.group = 0

    logger.close()
    accelerator.wait_for_everyone()
    if main:
        save_final(cfg, run_dir, save_model, state, setup)
        if cfg.plot_loss:
            plot_loss(state.history, run_dir / "loss.png")
        write_run_json(cfg, run_dir, state, setup, report, precision=precision, seconds=time.time() - t_start,
                       first_step_s=t_first_step, final_loss=last_loss, stopped_early=stopped_early,
                       cpu_malloc_tuned=malloc_tuned)
        say(f"done: {state.global_step} steps, final loss {last_loss:.4f}" if last_loss is not None else "done")
    accelerator.wait_for_everyone()
    return TrainResult(run_dir, state.global_step, last_loss, state.best_val_loss, stopped_early, is_main=main)


def _diverged(cfg: RunConfig, state: TrainState, run_dir: Path, what: str) -> TrainingDiverged:
    """The error for a non-finite step; the optimizer has not stepped, so every checkpoint is still good."""
    last = latest_checkpoint(run_dir)
    return TrainingDiverged([Problem(f"step {state.global_step + 1}", what,
                                     fix=f"lower learning_rate (now {cfg.learning_rate}) or check the data; "
                                         f"last good checkpoint: {last or 'none'}")])


def _due(step: int, every: int | None, total: int) -> bool:
    return bool(every) and (step % every == 0 or step == total)


def _evaluate(cfg, state, setup, loss_model, accelerator, logger, run_dir, save_model) -> bool:
    """Validation loss (mean per trained token) over the val set; returns True when early stopping fires."""
    loss_model.eval()
    total = torch.zeros((), device=accelerator.device)
    tokens = 0
    with torch.no_grad():
        for mb in setup.val_groups[accelerator.process_index::accelerator.num_processes]:
            batch = {k: v.to(accelerator.device) for k, v in setup.collate(mb, val=True).items()}
            with accelerator.autocast():
                s, _ = loss_model(**batch)
            total += s.float()
        tokens = sum(setup.tokens_of(mb, val=True) for mb in setup.val_groups)
    loss_model.train()
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, "sum")
    val_loss = total.item() / max(tokens, 1)
    record = {"step": state.global_step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}
    if cfg.eval_generation_metric and accelerator.is_main_process:
        with accelerator.autocast():  # as in training: frozen LoRA base weights may be stored in bf16
            record.update(setup.score_generations(accelerator.unwrap_model(loss_model).model, cfg))
    logger.log(record)
    state.history.append({"step": state.global_step, "val_loss": val_loss})
    logger.write(f"step {state.global_step}: val_loss {val_loss:.4f}")
    if state.best_val_loss is None or val_loss < state.best_val_loss - 1e-6:
        state.best_val_loss, state.best_step, state.evals_without_improvement = val_loss, state.global_step, 0
        if cfg.keep_best_checkpoint and accelerator.is_main_process:
            best = run_dir / "best"
            tmp = run_dir / ".tmp-best"
            shutil.rmtree(tmp, ignore_errors=True)
            save_model(tmp)
            shutil.rmtree(best, ignore_errors=True)
            tmp.rename(best)
        return False
    state.evals_without_improvement += 1
    patience = cfg.early_stopping_patience
    if patience and state.evals_without_improvement >= patience:
        logger.write(f"early stopping: no validation improvement in {patience} evaluations "
                     f"(best {state.best_val_loss:.4f} at step {state.best_step})")
        return True
    return False


def _model_saver(accelerator, model, cfg: RunConfig) -> Callable[[Path], None]:
    def save(path: Path) -> None:
        accelerator.unwrap_model(model).save_pretrained(path, safe_serialization=True)

    return save


def _load_weights(model, ckpt: Path) -> None:
    """Load a checkpoint's trainable weights into the built model (adapter or full model)."""
    from safetensors.torch import load_file

    adapter = ckpt / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(adapter))
        return
    files = sorted(ckpt.glob("model*.safetensors"))
    if not files:
        raise ConfigError([Problem("resume_from_checkpoint", "checkpoint has no model weights", value=str(ckpt))])
    state = {}
    for f in files:
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied weights (lm_head = embed_tokens) are saved once; anything else missing is an error
    missing = [m for m in missing if "lm_head" not in m]
    if missing:
        raise ConfigError([Problem("resume_from_checkpoint", f"checkpoint lacks weights: {missing[:5]}", value=str(ckpt))])


@contextlib.contextmanager
def _catch_signals(flag: list[int]):
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the end of the current step and stops."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum, _frame):
        if flag:  # second Ctrl-C: stop at once (the last complete checkpoint is still intact)
            raise KeyboardInterrupt
        flag.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def _stop_requested(flag: list[int], accelerator) -> bool:
    if accelerator.num_processes == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return accelerator.reduce(t, "sum").item() > 0


__all__ = ["TrainResult", "TrainingDiverged", "TrainingInterrupted", "train", "clean_partial", "list_checkpoints"]
