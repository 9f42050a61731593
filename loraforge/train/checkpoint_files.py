"""Where checkpoints live in a run dir and which are complete: no torch, so the manifest and the disk-space
guard (which `checkpoint.py` itself uses) can read them without an import cycle."""

from __future__ import annotations

import re
from pathlib import Path

STATE_FILE = "trainer_state.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _CKPT.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]
