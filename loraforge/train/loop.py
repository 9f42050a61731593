"""The training recipe, top to bottom: seed → model → method → data → prepare → loop → save.

Multi-GPU / multi-node runs use the same code under `accelerate launch` (DDP, FSDP, DeepSpeed come from
accelerate's own config); nothing here is a home-made distributed layer. Per optimizer step, the plan yields a
group of `gradient_accumulation_steps × world_size` micro-batches; process r takes every world_size-th one, so
the result equals a single-process run with the same global batch.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from loraforge.atomic import atomic_dir
from loraforge.config import RunConfig, save_config
from loraforge.errors import ConfigError, Problem
from loraforge.methods.common import peft_target_modules
from loraforge.objectives.base import step_metrics
from loraforge.train.checkpoint import TrainState, clean_partial, list_checkpoints, load_checkpoint, save_checkpoint
from loraforge.train.engine import (TrainingDiverged, TrainingInterrupted, accumulate, catch_stop_signals, diverged,
                                    due, seed_everything, stop_requested, stop_signal, update)
from loraforge.train.lock import holds_output_dir
from loraforge.train.logging import RunLogger, plot_loss, plotted


@dataclass
class TrainResult:
    run_dir: Path
    global_step: int
    final_loss: float | None
    best_val_loss: float | None
    stopped_early: bool
    is_main: bool = True  # False on the other ranks of `accelerate launch`: callers print only where it is True


@dataclass
class _Run:
    """What the steps of one run share: built by `_prepare`, advanced by the loop in `train`."""

    cfg: RunConfig
    say: Callable[[str], None]
    t_start: float
    precision: str
    accelerator: Any
    malloc_tuned: bool
    run_dir: Path
    setup: Any  # train.setup.Setup
    model: Any
    loss_model: Any
    report: Any  # the trainable-parameter report of build_model
    plan: Any  # train.setup.StepPlan
    optimizer: Any
    scheduler: Any
    state: TrainState
    logger: RunLogger
    save_model: Any  # train.sharding.ModelSaver: save_pretrained on rank 0 (gathered first under FSDP2)
    sharding: Any  # train.sharding.Sharding
    unwrapped_loss: Any  # the loss module without accelerate's wrapper (name-keyed FSDP2 optimizer state)
    continued_from: Path | None = None  # a checkpoint trained on other data whose weights this run starts from
    last_loss: float | None = None
    t_first_step: float | None = None
    window: dict = field(default_factory=dict)  # loss and tokens since the last logged step

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def checkpoint(self) -> Path | None:
        """Write checkpoint-<step> on the main process (never rotating away the best one), all processes in step."""
        from loraforge.train import sharding as sh

        self.accelerator.wait_for_everyone()
        path = None
        self.save_model.gather()  # FSDP2: every process takes part in gathering what rank 0 writes
        optimizer_state = sh.optimizer_state(self.unwrapped_loss, self.optimizer, self.sharding)
        if self.main:
            state = self.state
            best = self.run_dir / f"checkpoint-{state.best_step}" if state.best_step else None
            path = save_checkpoint(self.run_dir, state, self.save_model, self.optimizer, self.scheduler,
                                   protect=best, keep=self.cfg.save_total_limit, optimizer_state=optimizer_state)
        self.accelerator.wait_for_everyone()
        return path


@holds_output_dir  # not a model folder, and one run per output_dir
def train(cfg: RunConfig, *, echo: Callable[[str], None] = print) -> TrainResult:
    """Fine-tune as `cfg` says and write the run dir (see docs/ARCHITECTURE.md for its contract)."""
    run = _prepare(cfg, echo)
    state, plan, setup, accelerator = run.state, run.plan, run.setup, run.accelerator
    stopped_early = False
    with catch_stop_signals() as stop:
        run.loss_model.train()
        while state.epoch < plan.epochs and state.global_step < plan.total_steps:
            feed = setup.feed(plan.groups(state.epoch), start=state.group, rank=accelerator.process_index,
                              world_size=accelerator.num_processes)
            for group, mine in feed:
                if state.global_step >= plan.total_steps:
                    break
                _record_step(run, _optimizer_step(run, group, mine))
                if setup.val_groups and due(state.global_step, plan.eval_steps, plan.total_steps):
                    stopped_early = _evaluate(cfg, state, setup, run.loss_model, accelerator, run.logger, run.run_dir,
                                              run.save_model)
                if cfg.save_steps and state.global_step % cfg.save_steps == 0:
                    run.checkpoint()
                if stop_requested(stop, accelerator):
                    path = run.checkpoint()
                    run.logger.close()
                    raise TrainingInterrupted(path, stop_signal(stop), is_main=run.main)
                if stopped_early:
                    break
            if stopped_early:
                break
            state.epoch += 1
            state.group = 0
    run.logger.close()
    return _finish(run, stopped_early)


def _prepare(cfg: RunConfig, echo: Callable[[str], None]) -> _Run:
    """Seed → run dir → data → model → method → optimizer → resume: everything before the first step."""
    from loraforge.train import sharding as sh
    from loraforge.train.optim import build_optimizer, build_scheduler
    from loraforge.train.setup import (build_accelerator, build_data, build_model, prepare_run_dir, resolve_precision,
                                       step_plan, tune_cpu_malloc)

    t_start = time.time()
    precision = resolve_precision(cfg.precision)
    sharding = sh.sharding_for(cfg)
    with sh.accelerate_without_fsdp(sharding):  # FSDP2 is applied by train/sharding.py on CPU and GPU alike
        accelerator = build_accelerator(precision)
    malloc_tuned = cfg.tune_cpu_malloc and accelerator.device.type == "cpu" and tune_cpu_malloc()
    seed_everything(cfg.seed)
    main = accelerator.is_main_process
    say = echo if main else (lambda _msg: None)
    run_dir, resume_from = prepare_run_dir(cfg, is_main=main)
    # Every process has checked the run dir before the main one writes anything into it (else a slower rank
    # could mistake this run's fresh files for a previous run), and the main one has finished cleaning it.
    accelerator.wait_for_everyone()

    # Model and data. Data is built first: a bad line is reported before any weights are loaded.
    setup = build_data(cfg, say)
    plan = step_plan(cfg, setup, accelerator.num_processes)
    continued_from = None
    if resume_from is not None and not plan.same_data(_saved_plan(resume_from)):
        # The checkpoint's run trained on other data: the user continues training it on new data (the article's
        # incremental training), so its weights are the start and the optimizer and schedule are fresh.
        continued_from, resume_from = resume_from, None
        cfg = _continue_from(cfg, continued_from)
        say(f"continuing from the weights of {continued_from}: it was trained on other data, so this is a new run "
            "on this data with a fresh optimizer and schedule (recorded in run.json as continued_from)")
    start_from = None
    if continued_from is not None and cfg.init_adapter is None:  # a full / freeze run: the checkpoint holds the model
        start_from = lambda m: _load_weights(m, continued_from)  # noqa: E731
    model, loss_model, report = build_model(cfg, setup.model_dir, setup.tokenizer, say, setup.data, start_from)
    say(report.line())
    if resume_from is not None:
        _load_weights(model, resume_from)  # before sharding: every process loads the whole (consolidated) weights

    if sharding.fsdp and accelerator.num_processes > 1:
        if accelerator.device.type == "cpu" and not malloc_tuned:
            sh.return_freed_buffers_to_the_os()  # else the per-layer gather buffers pile up in the heap
        say(sh.shard(loss_model, model, sharding, accelerator.device))
    optimizer = build_optimizer(model, cfg)  # after sharding: FSDP2 optimizer state is sharded with the params
    scheduler = build_scheduler(optimizer, cfg, plan.total_steps)
    if sharding.fsdp:
        optimizer = accelerator.prepare(optimizer)  # no DDP wrapper around a sharded model
    else:
        loss_model, optimizer = accelerator.prepare(loss_model, optimizer)
    unwrapped_loss = accelerator.unwrap_model(loss_model)

    state = TrainState(world_size=accelerator.num_processes, plan=plan.signature())
    if resume_from is not None:
        state = load_checkpoint(resume_from, optimizer, scheduler, load_optimizer=lambda saved: sh.load_optimizer_state(
            unwrapped_loss, optimizer, saved, sharding))
        plan.check_resume(state.plan, resume_from)
        state.world_size, state.plan = accelerator.num_processes, plan.signature()
        say(f"resumed from {resume_from} at step {state.global_step}")
    if main:
        # the layers really adapted (the default or a preset resolved), so the saved config says what trained
        targets = peft_target_modules(model)
        saved = {"precision": precision, **({"target_modules": targets} if targets else {})}
        save_config(cfg.model_copy(update=saved), run_dir / "config.yaml")
        setup.tokenizer.save_pretrained(run_dir)
    say(f"{len(setup.data.train)} training examples, {plan.total_steps} optimizer steps "
        f"({plan.groups_per_epoch} per epoch, {precision}, batching={setup.batching}"
        f"{f', {accelerator.num_processes} processes' if accelerator.num_processes > 1 else ''})")

    logger = RunLogger(run_dir, total_steps=plan.total_steps, start_step=state.global_step, enabled=main,
                       tensorboard="tensorboard" in cfg.report_to, append=resume_from is not None)
    return _Run(cfg, say, t_start, precision, accelerator, malloc_tuned, run_dir, setup,
                model, loss_model, report, plan, optimizer, scheduler, state, logger,
                sh.ModelSaver(accelerator, model, sharding), sharding, unwrapped_loss, continued_from=continued_from,
                window=_new_window())


@dataclass(frozen=True)
class _Step:
    """One optimizer step's numbers."""

    tokens: int  # trained tokens of all processes: the true denominator
    loss_sum: float
    loss: float  # mean per trained token
    lr: float  # the rate this step used
    grad_norm: float | None  # None: DeepSpeed clips in its engine


def _optimizer_step(run: _Run, group: list, mine: list) -> _Step:
    """One optimizer step: forward/backward every micro-batch of this process, then clip and step.

    Raises:
        TrainingDiverged: a non-finite loss or gradient norm (before the optimizer steps on it).
    """
    cfg, state, accelerator, loss_model = run.cfg, run.state, run.accelerator, run.loss_model
    step_tokens = sum(run.setup.tokens_of(mb) for mb in group)

    @contextlib.contextmanager
    def context(last: bool):
        # DDP all-reduces the gradients in the backward of the step's last micro-batch only
        with (contextlib.nullcontext() if last else accelerator.no_sync(loss_model)), accelerator.autocast():
            yield

    def loss_of(batch):
        return loss_model(**{key: v.to(accelerator.device) for key, v in batch.items()})[0]

    # × world size because DDP averages gradients over processes.
    loss_sum = accumulate(mine, loss_of, lambda s: accelerator.backward(s / step_tokens * accelerator.num_processes),
                          context, device=accelerator.device)
    loss_sum = accelerator.reduce(loss_sum, "sum") if accelerator.num_processes > 1 else loss_sum
    step_loss = loss_sum.item() / max(step_tokens, 1)

    def stop(what: str) -> TrainingDiverged:
        run.logger.close()
        return diverged(state.global_step + 1, what, cfg.learning_rate, run.run_dir)

    if not math.isfinite(step_loss):
        raise stop(f"loss is {step_loss}")
    # fp16's loss scaler skips steps with inf/NaN gradients itself
    bad_grad = None if run.precision == "fp16" else (lambda g: stop(f"gradient norm is {g} (loss {step_loss:.4g})"))
    from loraforge.train.sharding import full_tensor

    # FSDP2 returns the norm as a DTensor: its full value is a collective every process computes
    lr, grad_norm = update(run.optimizer, run.scheduler,
                           lambda norm: full_tensor(accelerator.clip_grad_norm_(run.model.parameters(), norm)),
                           cfg.max_grad_norm, stop_on_bad_grad=bad_grad)
    return _Step(step_tokens, loss_sum.item(), step_loss, lr, grad_norm)


def _new_window() -> dict:
    return {"loss": 0.0, "tokens": 0, "t": time.time()}


def _record_step(run: _Run, step: _Step) -> None:
    """Advance the state by one step, update the progress bar, and log a metrics record every logging_steps."""
    cfg, state, plan, window = run.cfg, run.state, run.plan, run.window
    state.global_step += 1
    state.group += 1
    state.tokens_seen += step.tokens
    run.t_first_step = run.t_first_step or time.time() - run.t_start
    window["loss"] += step.loss_sum
    window["tokens"] += step.tokens
    run.last_loss = step.loss
    run.logger.progress(1, loss=step.loss, lr=step.lr, tok_s=window["tokens"] / max(time.time() - window["t"], 1e-9))
    if state.global_step % cfg.logging_steps == 0 or state.global_step == plan.total_steps:
        # epochs in units of a full pass, also inside a fractional last epoch
        epoch = round(state.epoch + state.group / plan.groups_per_epoch, 4)
        record = {"step": state.global_step, "epoch": epoch,
                  "loss": window["loss"] / max(window["tokens"], 1), "lr": step.lr,
                  "grad_norm": step.grad_norm,
                  "tokens": state.tokens_seen,
                  "tokens_per_s": window["tokens"] / max(time.time() - window["t"], 1e-9),
                  **step_metrics(run.loss_model, run.accelerator)}  # the objective's own (rewards, margins…)
        run.logger.log(record)
        state.history.append(plotted(record))
        run.window = _new_window()


def _finish(run: _Run, stopped_early: bool) -> TrainResult:
    """Save the final model, loss.png and run.json (main process), after every process has finished its steps."""
    from loraforge.train.setup import save_final, write_run_json

    cfg, state, last_loss = run.cfg, run.state, run.last_loss
    run.accelerator.wait_for_everyone()
    if not (cfg.keep_best_checkpoint and (run.run_dir / "best").is_dir()):
        run.save_model.gather()  # the final weights are written (FSDP2: gathered by every process first)
    if run.main:
        save_final(cfg, run.run_dir, run.save_model, state, run.setup)
        if cfg.plot_loss:
            plot_loss(state.history, run.run_dir / "loss.png")
        write_run_json(cfg, run.run_dir, state, run.setup, run.report, precision=run.precision,
                       seconds=time.time() - run.t_start, first_step_s=run.t_first_step, final_loss=last_loss,
                       stopped_early=stopped_early, cpu_malloc_tuned=run.malloc_tuned,
                       continued_from=str(run.continued_from) if run.continued_from else None)
        run.say(f"done: {state.global_step} steps, final loss {last_loss:.4f}" if last_loss is not None else "done")
    run.accelerator.wait_for_everyone()
    return TrainResult(run.run_dir, state.global_step, last_loss, state.best_val_loss, stopped_early, is_main=run.main)


def _evaluate(cfg, state, setup, loss_model, accelerator, logger, run_dir, save_model) -> bool:
    """Validation loss (mean per trained token) over the val set; returns True when early stopping fires."""
    loss_model.eval()
    total = torch.zeros((), device=accelerator.device)
    tokens = 0
    with torch.no_grad():
        mine = setup.val_groups[accelerator.process_index::accelerator.num_processes]
        # FSDP2: every forward is collective, so each process runs as many as the busiest one (the extra
        # ones on a repeated batch that is not counted)
        rounds = -(-len(setup.val_groups) // accelerator.num_processes) if save_model.sharding.fsdp else len(mine)
        for i in range(rounds):
            mb = mine[i] if i < len(mine) else setup.val_groups[0]
            batch = {k: v.to(accelerator.device) for k, v in setup.collate(mb, val=True).items()}
            with accelerator.autocast():
                s, _ = loss_model(**batch)
            if i < len(mine):
                total += s.float()
        tokens = sum(setup.tokens_of(mb, val=True) for mb in setup.val_groups)
    loss_model.train()
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, "sum")
    val_loss = total.item() / max(tokens, 1)
    record = {"step": state.global_step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)),
              **step_metrics(loss_model, accelerator, "val")}
    if cfg.eval_generation_metric and accelerator.is_main_process:
        with accelerator.autocast():  # as in training: frozen LoRA base weights may be stored in bf16
            record.update(setup.score_generations(accelerator.unwrap_model(loss_model).model, cfg))
    logger.log(record)
    state.history.append(plotted(record))
    logger.write(f"step {state.global_step}: val_loss {val_loss:.4f}")
    if state.best_val_loss is None or val_loss < state.best_val_loss - 1e-6:
        state.best_val_loss, state.best_step, state.evals_without_improvement = val_loss, state.global_step, 0
        if cfg.keep_best_checkpoint:
            save_model.gather()
        if cfg.keep_best_checkpoint and accelerator.is_main_process:
            with atomic_dir(run_dir / "best") as tmp:
                save_model(tmp)
        return False
    state.evals_without_improvement += 1
    patience = cfg.early_stopping_patience
    if patience and state.evals_without_improvement >= patience:
        logger.write(f"early stopping: no validation improvement in {patience} evaluations "
                     f"(best {state.best_val_loss:.4f} at step {state.best_step})")
        return True
    return False


def _saved_plan(ckpt: Path) -> dict:
    import json

    from loraforge.train.checkpoint import STATE_FILE

    return json.loads((ckpt / STATE_FILE).read_text()).get("plan", {})


def _continue_from(cfg: RunConfig, ckpt: Path) -> RunConfig:
    """The config of a new run that starts from the checkpoint's weights: an adapter checkpoint is loaded as
    `init_adapter` (its own target modules and rank), a full model's weights after the model is built."""
    update = {"resume_from_checkpoint": None}
    if (ckpt / "adapter_config.json").is_file():
        update["init_adapter"] = ckpt
    return cfg.model_copy(update=update)


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


__all__ = ["TrainResult", "TrainingDiverged", "TrainingInterrupted", "train", "clean_partial", "list_checkpoints"]
