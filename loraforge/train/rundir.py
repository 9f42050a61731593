"""The run directory's own files and rules (torch-free, so `preflight` checks them without the trainer).

`output_dir_problems` is the one place that decides whether a folder may receive a run: it is checked by
`validate` (preflight) and again by the trainer itself, so a library call of `train()` is as safe as the CLI.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from loraforge.errors import Problem

# What a finished text run leaves in output_dir besides checkpoint-N/ folders: removed when overwriting, and the
# sign that a folder already holds a run.
RUN_ARTIFACTS = ("run.json", "metrics.jsonl", "loss.png", "tensorboard", "best", "adapter_config.json",
                 "adapter_model.safetensors", "config.yaml")

# The record a model folder that loraforge itself wrote (merge, import-gguf, convert) carries.
LORAFORGE_MODEL_RECORDS = ("loraforge_merge.json", "loraforge_import.json")

# Files whose presence (without a loraforge run.json/config.yaml beside them) marks a folder as a model.
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.gguf", "*.pt", "*.pth", "*.ckpt")


def is_inside(path: Path, folder: Path) -> bool:
    """True when `path` is `folder` or lies inside it, after resolving symlinks of both."""
    p, f = Path(path).expanduser().resolve(), Path(folder).expanduser().resolve()
    return p == f or f in p.parents


def is_model_folder(path: Path) -> bool:
    """A folder that holds a model someone else made: config.json (or model_index.json) and weight files, and no
    loraforge run record beside them. A run of `method: full` also holds config.json and weights, but its run.json
    / config.yaml say it is a run, which may be overwritten on purpose."""
    path = Path(path)
    if not path.is_dir() or (path / "run.json").is_file() or (path / "config.yaml").is_file():
        return False
    if not ((path / "config.json").is_file() or (path / "model_index.json").is_file()):
        return False
    return any(any(path.glob(g)) for g in _WEIGHT_GLOBS)


def writable_dir_problem(path: Path, key: str) -> Problem | None:
    """A folder `path` could be created and written to? Checked by creating (and removing) a temporary folder in
    the nearest existing ancestor, so read-only mounts, /proc and missing permissions are found before any work."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        return Problem(key, "exists and is a file, not a folder", value=str(path),
                       fix="pick a folder path (or remove the file)")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return Problem(key, f"cannot be created: {probe} is a file", value=str(path), fix="pick a folder path")
    try:
        tempfile.TemporaryDirectory(dir=probe, prefix=".loraforge-write-test-").cleanup()
    except OSError as err:
        return Problem(key, f"cannot be created or written: {err.strerror or err} ({probe})", value=str(path),
                       fix="pick a folder on a writable disk you have permission to write to")
    return None


def output_dir_problems(output_dir: str | Path, model_dirs: list[Path], *, key: str = "output_dir") -> list[Problem]:
    """The rules every command that writes a run or model folder follows: never into (or onto) a model folder,
    never into the base model, and only where a folder can be written.

    Args:
        model_dirs: the model folders the command reads (the resolved base model, an adapter…).
    """
    out = Path(output_dir).expanduser()
    for model_dir in model_dirs:
        if is_inside(out, model_dir):
            return [Problem(key, f"is inside the base model folder {Path(model_dir).resolve()}: the run would "
                                 "overwrite the model's own files", value=str(output_dir),
                            allowed="a folder outside the base model", fix="pick another output folder, e.g. output/my-run")]
    if is_model_folder(out) or (out.is_symlink() and is_model_folder(out.resolve())):
        return [Problem(key, "is a model folder (config.json and weights, no loraforge run record): it would be "
                             "overwritten", value=str(output_dir), fix="pick a new, empty output folder")]
    problem = writable_dir_problem(out, key)
    return [problem] if problem else []



def base_model_dirs(base_model: str | Path) -> list[Path]:
    """The folder(s) a config's `base_model` reads: the path itself when it exists (a model dir, or the folder of a
    single file), else what a built-in name or .gguf resolves to; [] when it resolves to nothing (the recipe
    reports that itself)."""
    from loraforge.errors import LoraforgeError

    path = Path(str(base_model)).expanduser()
    found = [path] if path.exists() else []
    try:
        from loraforge.models.gguf import resolve_model_path

        found.append(resolve_model_path(base_model))
    except LoraforgeError:
        pass
    return found


def output_path_problems(out: str | Path, reads: list[Path], *, key: str = "--out",
                         replaces: bool = True) -> list[Problem]:
    """The rule for every command's output path (a file or a folder): it never overlaps what the command reads
    (the output inside a source, or a source inside the output that an overwrite would remove), never lies in or
    on a model folder, and, for a command that replaces its output folder (`replaces`), is not a run folder
    (run.json)."""
    out = Path(out).expanduser()
    for src in reads:
        if is_inside(out, src) or is_inside(src, out):
            return [Problem(key, f"overlaps {Path(src).expanduser().resolve()}, which this command reads: its files "
                                 "would be overwritten", value=str(out), fix="choose a new path outside it")]
    resolved = out.resolve()
    for folder in (resolved, *resolved.parents):
        if folder == resolved and any((folder / m).is_file() for m in LORAFORGE_MODEL_RECORDS):
            continue  # a model loraforge wrote (an earlier merge/import): the command's --overwrite rule decides
        if is_model_folder(folder):
            return [Problem(key, f"is inside the model folder {folder}: the model's own files would be overwritten",
                            value=str(out), fix="choose a new path outside every model folder")]
    if replaces and (resolved / "run.json").is_file():
        return [Problem(key, "is a training run folder (run.json): writing here would replace the run",
                        value=str(out), fix="choose a new folder, e.g. a subfolder of the run")]
    return []


def check_output_path(out: str | Path, reads: list[str | Path | None], *, key: str = "--out",
                      replaces: bool = True) -> None:
    """`output_path_problems`, raised. `reads` may hold None (an option not given).

    Raises:
        LoraforgeError: naming the key, the folder it would damage and the fix.
    """
    from loraforge.errors import LoraforgeError

    problems = output_path_problems(out, [Path(str(r)) for r in reads if r is not None and Path(str(r)).exists()],
                                    key=key, replaces=replaces)
    if problems:
        raise LoraforgeError(problems, title="refused: the output would damage existing files")
