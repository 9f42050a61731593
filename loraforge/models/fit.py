"""Does an adapter (or checkpoint) belong to this base model? Checked from file headers, without loading weights.

Three checks, each refusing with its reason:
  1. the recorded base: the base named in adapter_config.json (or the run's config.yaml), when that folder
     exists, must have the same architecture (config.json's sizes) as the base given now;
  2. shapes: every LoRA A/B matrix must fit the base module it adapts (in/out features from the base's
     safetensors headers) and that module must exist;
  3. coverage: every base module of the adapted kind (`target_modules`) must have its weights, so an adapter
     of a 2-layer model is not applied to the first 2 layers of a 30-layer one of the same width.
Prompt-learning adapters carry no per-module weights: their recorded num_layers / token_dim are compared
with the base's config instead.

`safetensors_problem` also reads only the header: a truncated file (its tensors end past the end of the file)
is found before torch or PEFT meet it.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

from loraforge.errors import ModelError, Problem

# config.json sizes that decide whether weights of one model fit another
_ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
              "num_key_value_heads", "vocab_size")
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def safetensors_header(path: Path) -> dict[str, Any]:
    """The tensor table of a .safetensors file: {name: {dtype, shape, data_offsets}}.

    Raises:
        ValueError: not a safetensors file, or its tensors end past the end of the file (truncated).
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes: too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"header says {n} bytes but the file has {size}: truncated")
        try:
            table = json.loads(f.read(n))
        except ValueError as err:
            raise ValueError(f"header is not valid JSON ({err})") from None
    tensors = {k: v for k, v in table.items() if k != "__metadata__"}
    end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
    if 8 + n + end > size:
        raise ValueError(f"its tensors need {8 + n + end} bytes but the file has {size}: truncated")
    return tensors


def safetensors_problem(path: Path, key: str) -> Problem | None:
    try:
        safetensors_header(path)
    except (OSError, ValueError) as err:
        return Problem(key, f"{path.name} is damaged: {err}", value=str(path),
                       fix="copy or save the file again (a download or copy that stopped early leaves this)")
    return None


def weights_problems(model_dir: Path, key: str = "base_model") -> list[Problem]:
    """A damaged .safetensors file in a model folder (for `validate`, which reads no weights)."""
    return [p for f in sorted(Path(model_dir).glob("*.safetensors")) if (p := safetensors_problem(f, key))]


def _shapes(model_dir: Path) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        try:
            shapes.update({k: v["shape"] for k, v in safetensors_header(f).items()})
        except (OSError, ValueError):
            pass  # reported by weights_problems / the loader
    return shapes


def _arch(model_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    config = config.get("text_config", config) if isinstance(config, dict) else {}
    return {k: config[k] for k in _ARCH_KEYS if k in config}


def arch_problem(trained_on: Path, base_dir: Path, key: str, what: str, fix: str | None = None) -> Problem | None:
    """The recorded base (a folder) and the given one differ in architecture."""
    a, b = _arch(trained_on), _arch(base_dir)
    diff = [k for k in _ARCH_KEYS if k in a and k in b and a[k] != b[k]]
    if not diff:
        return None
    shown = ", ".join(f"{k} {a[k]} vs {b[k]}" for k in diff[:3])
    return Problem(key, f"{what} belongs to a different model than the base {base_dir} ({shown})",
                   fix=fix or f"use the base it was trained on: {trained_on}")


def _recorded_base(adapter_dir: Path, config: dict) -> Path | None:
    from loraforge.inference.adapter_files import read_run_config

    for name in (read_run_config(adapter_dir).get("base_model"), config.get("base_model_name_or_path")):
        if name and Path(str(name)).expanduser().is_dir():
            return Path(str(name)).expanduser()
    return None


def adapter_fit_problems(adapter_dir: str | Path, base_dir: str | Path, *, key: str = "adapter") -> list[Problem]:
    """Every reason the PEFT adapter in `adapter_dir` does not fit the model in `base_dir` ([] when it fits)."""
    adapter_dir, base_dir = Path(adapter_dir), Path(base_dir)
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return [Problem(key, f"cannot read adapter_config.json: {err}", value=str(adapter_dir))]
    weights = adapter_dir / "adapter_model.safetensors"
    if (damaged := safetensors_problem(weights, key)) is not None:
        return [damaged]
    recorded = _recorded_base(adapter_dir, config)
    if recorded is not None and recorded.resolve() != base_dir.resolve():
        if (p := arch_problem(recorded, base_dir, key, f"the adapter {adapter_dir}")) is not None:
            return [p]
    if config.get("peft_type") != "LORA":
        return _prompt_learning_problems(adapter_dir, base_dir, config, key)
    base_shapes = _shapes(base_dir)
    if not base_shapes:
        return []  # a base without safetensors weights: nothing to compare with here (the loader decides)
    return _lora_problems(adapter_dir, base_dir, config, safetensors_header(weights), base_shapes, key)


def _lora_problems(adapter_dir: Path, base_dir: Path, config: dict, tensors: dict, base_shapes: dict,
                   key: str) -> list[Problem]:
    where = f"the adapter {adapter_dir} does not fit the base {base_dir}"
    fix = f"use the base it was trained on ({config.get('base_model_name_or_path') or 'see its config.yaml'})"
    adapted: set[str] = set()
    for name, info in tensors.items():
        m = _LORA_KEY.match(name)
        if m is None or "embedding" in name:
            continue
        module, ab, shape = m.group("module"), m.group("ab"), info["shape"]
        adapted.add(module)
        base = base_shapes.get(f"{module}.weight")
        if base is None:
            return [Problem(key, f"{where}: it adapts `{module}`, which the base does not have", fix=fix)]
        if len(base) == 2 and len(shape) == 2:
            need, got = (base[1], shape[1]) if ab == "A" else (base[0], shape[0])
            if need != got:
                return [Problem(key, f"{where}: `{module}` is {base[0]}×{base[1]} in the base, the adapter's "
                                     f"lora_{ab} is {shape[0]}×{shape[1]}", fix=fix)]
    targets = config.get("target_modules")
    if isinstance(targets, str) or not targets or config.get("layers_to_transform") or config.get("exclude_modules"):
        return []  # a regex or a layer subset: which modules should be there is PEFT's rule, not checked here
    suffixes = set(targets)
    wanted = {k[:-len(".weight")] for k, s in base_shapes.items()
              if k.endswith(".weight") and len(s) == 2 and k[:-len(".weight")].rsplit(".", 1)[-1] in suffixes}
    missing = sorted(wanted - adapted)
    if missing and adapted:
        return [Problem(key, f"{where}: it has weights for {len(wanted & adapted)} of the base's {len(wanted)} "
                             f"{'/'.join(sorted(suffixes))} modules (missing e.g. `{missing[0]}`): it was trained on a "
                             "model with other layers", fix=fix)]
    return []


def _prompt_learning_problems(adapter_dir: Path, base_dir: Path, config: dict, key: str) -> list[Problem]:
    arch = _arch(base_dir)
    checks = [("num_layers", "num_hidden_layers")]
    if config.get("peft_type") in ("PROMPT_TUNING", "P_TUNING"):  # prefix tuning's token_dim is the key/value width
        checks.append(("token_dim", "hidden_size"))
    for mine, theirs in checks:
        if config.get(mine) and theirs in arch and config[mine] != arch[theirs]:
            return [Problem(key, f"the adapter {adapter_dir} was made for a model with {theirs} {config[mine]}, the "
                                 f"base {base_dir} has {arch[theirs]}",
                            fix=f"use the base it was trained on ({config.get('base_model_name_or_path')})")]
    return []


def check_adapter_fits(adapter_dir: str | Path, base_dir: str | Path, *, key: str = "adapter") -> None:
    """Raises:
        ModelError: the adapter is damaged or belongs to another base (the first reason found)."""
    problems = adapter_fit_problems(adapter_dir, base_dir, key=key)
    if problems:
        raise ModelError(problems, title="adapter does not fit the base model")


def checkpoint_fit_problems(ckpt: Path, base_dir: Path, *, key: str = "resume_from_checkpoint") -> list[Problem]:
    """A checkpoint (adapter or complete model) against the base of the run resuming it."""
    if (ckpt / "adapter_config.json").is_file():
        return adapter_fit_problems(ckpt, base_dir, key=key)
    if (ckpt / "config.json").is_file():
        p = arch_problem(ckpt, base_dir, key, f"the checkpoint {ckpt}",
                         fix="resume with the base_model of the interrupted run, or start a new run")
        return [p] if p is not None else []
    return []
