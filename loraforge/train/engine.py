"""The pieces of a training loop that both recipes share: the text recipe (train/loop.py) and the Stable Diffusion
LoRA recipe (image/train.py) differ in their model and loss, not in how they seed, accumulate gradients, step the
optimizer, stop on a diverged loss, or turn Ctrl-C into a checkpoint.

Each piece is a small function that takes what it works on (the loop passes its own closures for the parts that
differ: accelerate's backward and clipping for text, a GradScaler for images), so each recipe's loop stays visible
code in its own file.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loraforge.errors import LoraforgeError, Problem
from loraforge.train.checkpoint import latest_checkpoint


class TrainingInterrupted(Exception):
    """Ctrl-C / SIGTERM: a checkpoint was written; `.checkpoint` says where."""

    def __init__(self, checkpoint: Path | None, signum: int, is_main: bool = True):
        self.checkpoint, self.signum, self.is_main = checkpoint, signum, is_main
        super().__init__(f"interrupted by signal {signum}")


class TrainingDiverged(LoraforgeError):
    title = "training stopped"


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (torch's seeds every CUDA device too)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # NumPy takes 32-bit seeds only
    torch.manual_seed(seed)


def accumulate(micro_batches: Sequence[Any], loss_of: Callable[[Any], torch.Tensor],
               backward: Callable[[torch.Tensor], None],
               context: Callable[[bool], contextlib.AbstractContextManager] | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Forward and backward every micro-batch of one optimizer step, so their gradients add up.

    Args:
        loss_of: a micro-batch's loss (a 0-dim tensor).
        backward: backpropagates one loss, scaled as the recipe's objective says (÷ tokens, ÷ micro-batches).
        context: wraps forward and backward of a micro-batch; gets True for the step's last one (where DDP
            synchronizes gradients).

    Returns:
        The detached float32 sum of the micro-batch losses.
    """
    total = torch.zeros((), device=device)
    for k, micro_batch in enumerate(micro_batches):
        with context(k == len(micro_batches) - 1) if context else contextlib.nullcontext():
            loss = loss_of(micro_batch)
            backward(loss)
        total += loss.detach().float()
    return total


def update(optimizer, scheduler, clip: Callable[[float], Any], max_grad_norm: float | None, *,
           stop_on_bad_grad: Callable[[float], Exception] | None,
           step: Callable[[], None] | None = None) -> tuple[float, float | None]:
    """Clip the gradients (or only measure their norm), step optimizer and scheduler, and zero the gradients.

    Args:
        clip: clips to the given norm and returns the norm before clipping (None where an engine clips itself).
        max_grad_norm: None means no clipping, but the norm is still measured and logged.
        stop_on_bad_grad: the error to raise for a non-finite gradient norm (None: don't check, as under fp16,
            whose loss scaler skips such steps itself). A finite loss can still give inf/NaN gradients (weights
            already huge); stepping on them would put NaN weights into the next checkpoint.
        step: the optimizer step (default `optimizer.step`; a GradScaler's step-and-update for fp16).

    Returns:
        The learning rate this step used and the gradient norm.
    """
    grad_norm = clip(max_grad_norm or math.inf)
    grad_norm = None if grad_norm is None else float(grad_norm)
    if stop_on_bad_grad is not None and grad_norm is not None and not math.isfinite(grad_norm):
        raise stop_on_bad_grad(grad_norm)
    lr = scheduler.get_last_lr()[0]  # the rate this step used (read before the scheduler advances)
    (step or optimizer.step)()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr, grad_norm


def diverged(step: int, what: str, learning_rate: float, run_dir: Path) -> TrainingDiverged:
    """The error for a non-finite optimizer step `step`; the optimizer has not stepped on it, so every checkpoint
    is still good."""
    last = latest_checkpoint(run_dir)
    return TrainingDiverged([Problem(f"step {step}", what,
                                     fix=f"lower learning_rate (now {learning_rate}) or check the data; "
                                         f"last good checkpoint: {last or 'none'}")])


def due(step: int, every: int | None, total: int) -> bool:
    """Whether something done every `every` steps (and at the last one) is done after `step`."""
    return bool(every) and (step % every == 0 or step == total)


@contextlib.contextmanager
def catch_stop_signals() -> Iterator[list[int]]:
    """Yield a list that SIGINT/SIGTERM append their number to: the loop checkpoints at the end of the current step
    and stops. A second signal stops at once (the last complete checkpoint is intact: they are written atomically).
    Signals reach only the main thread, so elsewhere the list stays empty."""
    flag: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, _frame):
        if flag:
            raise KeyboardInterrupt
        flag.append(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def stop_requested(flag: list[int], accelerator=None) -> bool:
    """Whether any process got a stop signal (all processes must stop at the same step)."""
    if accelerator is None or accelerator.num_processes == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return accelerator.reduce(t, "sum").item() > 0


def stop_signal(flag: list[int]) -> int:
    return flag[0] if flag else signal.SIGTERM
