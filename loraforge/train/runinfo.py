"""run.json: what a finished run says about itself. Both recipes write the same header (status, versions, the
code's git sha) followed by their own fields, through one atomic write."""

from __future__ import annotations

import importlib
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

from loraforge.atomic import atomic_write_text


def run_header(packages: tuple[str, ...]) -> dict[str, Any]:
    """The fields every run.json starts with; `packages` are the libraries whose versions it records."""
    import loraforge

    return {"status": "finished", "loraforge": loraforge.__version__,
            "versions": {"python": platform.python_version(),
                         **{name: importlib.import_module(name).__version__ for name in packages}},
            "git_sha": _git_sha()}


def write_run_json(run_dir: Path, info: dict[str, Any]) -> None:
    atomic_write_text(run_dir / "run.json", json.dumps(info, indent=1, default=str))


def _git_sha() -> str | None:
    try:
        # the code's version, not that of whatever directory the run was started from
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
