"""The folders the web UI may read and write: the workspace and explicit extra roots, nothing else.

Every path that comes from a request goes through `Workspace.resolve`, which resolves symlinks and `..` first
and then refuses anything outside the roots, so no form field or query string reaches another file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from loraforge.errors import LoraforgeError, Problem

DATA_SUFFIXES = (".jsonl", ".json", ".csv")
SKIP_DIRS = {".git", ".venv", "node_modules", "__pycache__", ".webui", "tensorboard"}
MAX_SCAN = 4000  # files visited per listing: a huge workspace stays responsive


class PathRefused(LoraforgeError):
    title = "path refused"


@dataclass
class Workspace:
    """`root` is where configs, runs and reports go; `extra_roots` may be read (models, data) too."""

    root: Path
    extra_roots: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.extra_roots = [Path(r).resolve() for r in self.extra_roots]
        (self.root / ".webui").mkdir(parents=True, exist_ok=True)

    @property
    def roots(self) -> list[Path]:
        return [self.root] + self.extra_roots

    @property
    def state_dir(self) -> Path:
        """The UI's own bookkeeping (child-process logs, pids, exit codes)."""
        return self.root / ".webui"

    def resolve(self, value: str | Path, *, key: str = "path", must_exist: bool = False) -> Path:
        """`value` (relative to the workspace, or absolute) as a resolved path inside one of the roots.

        Raises:
            PathRefused: outside every root (after resolving `..` and symlinks), or missing when `must_exist`.
        """
        text = str(value).strip()
        if not text or "\x00" in text:
            raise PathRefused([Problem(key, "empty or invalid path", value=text)])
        path = Path(text).expanduser()
        path = (path if path.is_absolute() else self.root / path).resolve()
        if not self._inside(path):
            raise PathRefused([Problem(key, "is outside the workspace", value=text,
                                       allowed=", ".join(str(r) for r in self.roots),
                                       fix="put the file under the workspace, or start webui with --root DIR")])
        if must_exist and not path.exists():
            raise PathRefused([Problem(key, "does not exist", value=text)])
        return path

    def _inside(self, path: Path) -> bool:
        return any(path == r or r in path.parents for r in self.roots)

    def relative(self, path: Path) -> str:
        """How the UI shows a path: relative to the workspace when inside it."""
        try:
            return str(path.resolve().relative_to(self.root)) or "."
        except ValueError:
            return str(path)

    # --- listings ---------------------------------------------------------------------------------

    def _walk(self, root: Path):
        seen = 0
        stack = [root]
        while stack and seen < MAX_SCAN:
            folder = stack.pop()
            try:
                entries = sorted(folder.iterdir())
            except OSError:
                continue
            for entry in entries:
                seen += 1
                if entry.is_symlink() and (entry.is_dir() or not self._inside(entry.resolve())):
                    continue  # no loops, and nothing outside the roots through a link
                if entry.is_dir():
                    if entry.name not in SKIP_DIRS and not entry.name.startswith("checkpoint-"):
                        stack.append(entry)
                        yield entry
                else:
                    yield entry

    def models(self) -> list[dict]:
        """The built-in model, HF model dirs (a config.json with weights or tokenizer) and .gguf files."""
        out = [{"value": "smollm2", "label": "smollm2 (built-in SmolLM2-135M-Instruct)", "kind": "built-in"}]
        for root in self.roots:
            for p in self._walk(root):
                if p.is_file() and p.suffix == ".gguf":
                    out.append({"value": self.relative(p), "label": self.relative(p), "kind": "gguf"})
                elif p.is_dir() and (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
                    out.append({"value": self.relative(p), "label": self.relative(p), "kind": _model_kind(p)})
        return out

    def datasets(self) -> list[dict]:
        out = []
        for root in self.roots:
            for p in self._walk(root):
                if p.is_file() and p.suffix in DATA_SUFFIXES and not _is_run_file(p):
                    out.append({"value": self.relative(p), "label": self.relative(p)})
        return out

    def configs(self) -> list[str]:
        return [self.relative(p) for p in self._walk(self.root)
                if p.is_file() and p.suffix in (".yaml", ".yml") and p.name != "config.yaml"]

    def run_dirs(self) -> list[Path]:
        """Folders holding a text run: a config.yaml next to metrics.jsonl or a checkpoint (CLI or UI started)."""
        out = []
        for p in self._walk(self.root):
            if p.is_dir() and (p / "config.yaml").is_file() and (
                    (p / "metrics.jsonl").is_file() or any(p.glob("checkpoint-*"))):
                out.append(p)
        return out


def _model_kind(model_dir: Path) -> str:
    """How the picker names a model dir: a ChatGLM2/3, Baichuan2 or Qwen-1 checkpoint says it is converted to
    its native architecture (or why it is not), a converted one says where it came from."""
    from loraforge.models.native import CONVERTED_KEY, family_of_checkpoint, read_raw_config

    raw = read_raw_config(model_dir)
    if raw is None:
        return "hf dir"
    if raw.get(CONVERTED_KEY):
        return f"converted from {raw[CONVERTED_KEY]}"
    family = family_of_checkpoint(raw)
    if family is None:
        return "hf dir"
    why = family.refusal(raw, model_dir)
    return f"{family.name} checkpoint: " + (f"not convertible ({why})" if why else
                                             f"converts to native {family.native_architecture}")


def _is_run_file(p: Path) -> bool:
    return p.name in ("run.json", "adapter_config.json", "tokenizer.json", "tokenizer_config.json", "config.json",
                      "special_tokens_map.json", "generation_config.json", "report.json") or p.parent.name == ".webui"


def preview_rows(path: Path, n: int = 5) -> list[dict]:
    """The first `n` rows of a data file, as parsed JSON (or text for what does not parse)."""
    rows: list[dict] = []
    with path.open(encoding="utf-8", errors="replace") as f:
        if path.suffix == ".json":
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                return [{"error": f"not valid JSON: {e}"}]
            return list(data[:n]) if isinstance(data, list) else [data]
        for line in f:
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    rows.append({"text": line.strip()[:500]})
            if len(rows) >= n:
                break
    return rows
