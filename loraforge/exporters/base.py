"""The record every export target registers, and the request/result it speaks.

A target is one module, `loraforge/exporters/<name>.py`, that builds an `Exporter`; `exporters/__init__.py`
lists it in `EXPORTERS`. The CLI's `export --to NAME` looks the name up there and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class ExportRequest:
    """What the user asked for.

    Attributes:
        run_dir: a run's output_dir (an adapter run, or a full/freeze run's complete model).
        out: the folder the export is written to (created atomically).
        quant: GGUF tensor type (`f16`, `bf16`, `q8_0`…); ignored by targets that write no GGUF.
        base: the base model, when the run's config.yaml should not decide.
        name: the model name recorded in the files (default: the run folder's name).
        overwrite: replace a non-empty `out`.
        progress: show a progress bar while tensors are written.
        base_gguf: the base model's GGUF file (or Ollama model name) a GGUF LoRA is applied to.
    """

    run_dir: Path
    out: Path
    quant: str = "f16"
    base: str | None = None
    name: str | None = None
    overwrite: bool = False
    progress: bool = True
    base_gguf: str | None = None


@dataclass
class ExportResult:
    """What an export wrote: its files and the next command for the user."""

    out: Path
    files: list[Path] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # what the CLI prints (summary, checks, next step)

    def format(self) -> str:
        return "\n".join(self.lines)

    __str__ = format


@dataclass(frozen=True)
class Exporter:
    """One `export --to NAME` target: `run(request)` writes `request.out` and says what it did."""

    name: str
    help: str
    run: Callable[[ExportRequest], ExportResult]


def check_output(request: ExportRequest) -> None:
    """Refuse a non-empty `out` unless `--overwrite`.

    Raises:
        LoraforgeError: `out` exists, is not empty and `overwrite` is off.
    """
    from loraforge.errors import LoraforgeError, Problem

    out = Path(request.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not request.overwrite:
        raise LoraforgeError([Problem("--out", "output folder exists and is not empty", value=str(out),
                                      fix="choose a new folder or pass --overwrite")])


def output_dir(request: ExportRequest) -> Any:
    """`atomic_dir(request.out)`, after `check_output(request)`."""
    from loraforge.atomic import atomic_dir

    check_output(request)
    return atomic_dir(Path(request.out))
