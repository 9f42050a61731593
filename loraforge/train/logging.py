"""Run observability: metrics.jsonl, TensorBoard events, a progress bar, and loss.png at the end."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


class RunLogger:
    """Writes every logged record to metrics.jsonl (and TensorBoard); only the main process logs."""

    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int, enabled: bool,
                 tensorboard: bool, append: bool):
        self.enabled = enabled
        self.run_dir = run_dir
        self.tb = None
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not enabled, unit="step",
                        dynamic_ncols=True, desc="train")
        if not enabled:
            return
        if append:
            _drop_records_after(run_dir / "metrics.jsonl", start_step)
        self.metrics = (run_dir / "metrics.jsonl").open("a" if append else "w", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events at steps >= it, which the interrupted run logged after its checkpoint
            # and this run is about to log again.
            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1 if append else None)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "time", "epoch") and isinstance(v, (int, float)):
                    self.tb.add_scalar(k.replace("val_", "val/").replace("train_", "train/"), v, record["step"])
            self.tb.flush()

    def progress(self, n: int, **postfix: Any) -> None:
        self.bar.update(n)
        if postfix:
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()}, refresh=False)

    def write(self, message: str) -> None:
        if self.enabled:
            self.bar.write(message)

    def close(self) -> None:
        self.bar.close()
        if self.enabled:
            self.metrics.close()
            if self.tb is not None:
                self.tb.close()


def _drop_records_after(path: Path, step: int) -> None:
    """A resumed run repeats the steps after its checkpoint: drop the interrupted run's records of them."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and _record_step(line) <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _record_step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:  # a line cut short by kill -9
        return float("inf")


REWARD_CURVES = ("rewards/chosen", "rewards/rejected", "rewards/margins")  # preference stages (objectives/)
ACCURACY_CURVE = "rewards/accuracies"


def plotted(record: dict[str, Any]) -> dict[str, Any]:
    """The part of a logged record that loss.png draws (kept in the train state's history, so a resumed run's
    plot is whole): the step, the loss and, for a preference stage, its rewards and reward accuracy."""
    keys = ("loss", *REWARD_CURVES, ACCURACY_CURVE)
    return {k: v for k, v in record.items() if k == "step" or k.removeprefix("val_") in keys}


def _series(history: list[dict], key: str) -> list[tuple[float, float]]:
    return [(r["step"], r[key]) for r in history if isinstance(r.get(key), (int, float))]


def plot_loss(history: list[dict], out_png: Path) -> Path | None:
    """Train and validation loss against the optimizer step; for a preference stage, a second panel with the
    rewards (chosen, rejected, margins) and the reward accuracy, train lines and validation markers."""
    train = _series(history, "loss")
    val = _series(history, "val_loss")
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display; must be set before pyplot is imported
    import matplotlib.pyplot as plt

    rewards = any(_series(history, k) for k in (*REWARD_CURVES, ACCURACY_CURVE))
    fig, axes = plt.subplots(2 if rewards else 1, 1, figsize=(7, 7 if rewards else 4), dpi=100, sharex=True,
                             squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), marker="o", label="validation loss")
    ax.set_ylabel("loss" if rewards else "loss (mean per trained token)")
    ax.grid(alpha=0.3)
    ax.legend()
    if rewards:
        ax = axes[1][0]
        acc = ax.twinx()
        for k in REWARD_CURVES:
            name = k.split("/")[1]
            if _series(history, k):
                line, = ax.plot(*zip(*_series(history, k)), label=name)
                if _series(history, "val_" + k):
                    ax.plot(*zip(*_series(history, "val_" + k)), marker="o", ls="none", color=line.get_color(),
                            label=f"validation {name}")
        for k, style in ((ACCURACY_CURVE, dict(color="black", ls="--")),
                         ("val_" + ACCURACY_CURVE, dict(color="black", marker="s", ls="none"))):
            if _series(history, k):
                acc.plot(*zip(*_series(history, k)), label=k.replace("rewards/", "").replace("val_", "validation "),
                         **style)
        acc.set_ylim(-0.05, 1.05)
        acc.set_ylabel("reward accuracy")
        ax.set_ylabel("reward (β · log-ratio)")
        ax.grid(alpha=0.3)
        handles = ax.get_legend_handles_labels()[0] + acc.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], fontsize="small", loc="upper left")
    axes[-1][0].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
