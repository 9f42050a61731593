"""A training on several processes from the UI: the child becomes
`torchrun --standalone --nproc_per_node N -m loraforge train CONFIG` (as docs/TRAINING.md runs it by hand).

The strategy stays the config's own `sharding` key (ddp, or fsdp2 — which plain torchrun honours, see
`loraforge/train/sharding.py`), so the saved YAML is all the CLI needs to repeat the run. `--standalone` picks a
free rendezvous port on this machine, so two UIs (or a UI and a CLI run) never collide on a fixed port. The
process count is a launch option, not a config key: it is recorded in the job (resume uses it again) and is
checked against the machine (GPUs with CUDA, cores without).
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import Any

from loraforge.errors import Problem

# torchrun waits this long for its workers after a stop before SIGKILL (its default, 30 s, can cut a big
# checkpoint short); the workers stop at the end of their step and write the checkpoint.
SHUTDOWN_TIMEOUT_S = "600"


def torchrun_args(processes: int) -> list[str]:
    return ["--standalone", "--nproc_per_node", str(processes)]


def launcher(processes: int) -> list[str]:
    """What runs `loraforge <kind> …` on `processes` processes (torchrun through this Python)."""
    if processes <= 1:
        return [sys.executable, "-m", "loraforge"]
    return [sys.executable, "-m", "torch.distributed.run", *torchrun_args(processes), "-m", "loraforge"]


def shown_command(kind: str, args: list[str], processes: int = 1) -> str:
    """The command as a user would type it (shown in the UI and as the log's first line)."""
    if processes <= 1:
        return shlex.join(["loraforge", kind, *args])
    return shlex.join(["torchrun", *torchrun_args(processes), "-m", "loraforge", kind, *args])


def child_env(processes: int) -> dict[str, str]:
    env = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if processes > 1:
        env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", SHUTDOWN_TIMEOUT_S)
    return env


def machine_limit() -> tuple[int, str]:
    """How many processes this machine can run one each: (GPUs, "GPUs") with CUDA, else (cores, "CPU cores")."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count(), "GPUs"
    return os.cpu_count() or 1, "CPU cores"


def parse_processes(value: Any) -> tuple[int, list[Problem]]:
    """The form's `processes` value → (count, problems). An empty value is 1."""
    text = "" if value is None else str(value).strip()
    if not text:
        return 1, []
    try:
        n = int(text)
    except ValueError:
        n = 0
    limit, what = machine_limit()
    if n < 1:
        return 1, [Problem("processes", "must be a whole number of processes", value=text, allowed=f"1–{limit}",
                           fix="processes: 1 (one process), or one per GPU")]
    if n > limit:
        return n, [Problem("processes", f"more processes than this machine has {what} ({limit})", value=n,
                           allowed=f"1–{limit}", fix=f"processes: {limit}")]
    return n, []
