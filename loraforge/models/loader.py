"""Load a tokenizer and a model with the Auto class that fits the task type.

Every user mistake that can be seen before reading weights (missing dir, remote code off, a task type the
architecture cannot do, a config-only dir) is raised as a ModelError first; only then are weights read.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge.config.schema import TaskType
from loraforge.errors import ModelError, Problem
# AUTO_CLASSES is also imported from here (tests, tiny.py); it lives in hf_config, below discovery and loader.
from loraforge.models.hf_config import AUTO_CLASSES, is_remote_placeholder, load_hf_config, remote_code_problem
from loraforge.models.registry import check_task_type

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "fp16": "float16", "half": "float16"}
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def resolve_dtype(dtype: "str | torch.dtype", device_map: Any = None) -> "torch.dtype":
    """`auto` → float32 on CPU, bfloat16 on a CUDA GPU that supports it (float16 on older GPUs).

    Raises:
        ModelError: an unknown dtype name.
    """
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower()
    if name == "auto":
        on_cpu = device_map in ("cpu", {"": "cpu"}) or not torch.cuda.is_available()
        if on_cpu:
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in _DTYPE_NAMES:
        raise ModelError([Problem("torch_dtype", "unknown dtype", value=dtype,
                                  allowed="auto, float32, bfloat16, float16")])
    return getattr(torch, _DTYPE_NAMES[name])


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False) -> "PreTrainedTokenizerBase":
    """The model's tokenizer, with a pad token (the eos token when it has none). The eos token is never changed:
    the chat template and generation stop on it.

    Raises:
        ModelError: no tokenizer files, or a tokenizer with neither pad nor eos token.
    """
    from transformers import AutoTokenizer

    from loraforge.models.gguf import resolve_model_path

    path = resolve_model_path(model_dir)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError([Problem("base_model", f"cannot load a tokenizer from {path}: {str(err).splitlines()[0]}",
                                  value=str(model_dir), fix="the model folder needs its tokenizer files "
                                  "(tokenizer.json or tokenizer_config.json + vocab)")]) from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError([Problem("base_model", "the tokenizer has neither a pad token nor an eos token, so "
                                      "batches cannot be padded", value=str(model_dir),
                                      fix="add a pad token to the tokenizer files")])
        tok.pad_token = tok.eos_token
    return tok


def _check_loadable(path: Path, hf_config: Any, task_type: TaskType, trust_remote_code: bool) -> None:
    if is_remote_placeholder(hf_config):
        raise ModelError([remote_code_problem(hf_config, trust_remote_code)])
    problems = check_task_type(hf_config, task_type)
    if problems:
        raise ModelError(problems)
    if not any(any(path.glob(g)) for g in _WEIGHT_GLOBS):
        raise ModelError([Problem("base_model", "the folder has a config.json but no weights (*.safetensors / *.bin)",
                                  value=str(path), fix="`loraforge inspect` works from the config alone; training "
                                  "needs the weights — download them into this folder")])


def load_model(model_dir: str | Path, task_type: TaskType, *, dtype: "str | torch.dtype" = "auto",
               attn_implementation: str = "auto", trust_remote_code: bool = False, num_labels: int | None = None,
               id2label: dict[int, str] | None = None, quantization_config: Any = None,
               device_map: Any = None, **config_overrides: Any) -> "PreTrainedModel":
    """Load the model with the Auto class for `task_type` (see AUTO_CLASSES).

    Args:
        model_dir: a local HF model dir, a .gguf file or a built-in name (`smollm2`).
        task_type: picks the Auto class; checked against the architecture first.
        dtype: `auto` (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16 or a torch.dtype.
        attn_implementation: `auto` (transformers' choice, sdpa when available), sdpa, eager, flash_attention_2.
        num_labels, id2label: classification heads (SEQ_CLS, TOKEN_CLS); num_labels defaults to len(id2label).
        quantization_config: e.g. a transformers BitsAndBytesConfig (QLoRA).
        device_map: passed to from_pretrained (None: load on CPU).
        config_overrides: config fields set before the model is built (e.g. ChatGLM's `pre_seq_len` for its
            native prefix encoder); transformers applies keyword arguments that name config fields to the config.

    Raises:
        ModelError: missing dir, remote code needed but off, task type unfit for the architecture, no weights,
            flash attention without CUDA.
    """
    import transformers

    from loraforge.models.gguf import resolve_model_path

    path = resolve_model_path(model_dir)
    hf_config = load_hf_config(path, trust_remote_code)
    _check_loadable(path, hf_config, task_type, trust_remote_code)

    kwargs: dict[str, Any] = {**config_overrides, "dtype": resolve_dtype(dtype, device_map),
                              "trust_remote_code": trust_remote_code}
    if attn_implementation != "auto":
        _check_attention(attn_implementation)
        kwargs["attn_implementation"] = attn_implementation
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device_map is not None:
        kwargs["device_map"] = device_map
    if task_type in (TaskType.SEQ_CLS, TaskType.TOKEN_CLS):
        if id2label:
            id2label = {int(k): str(v) for k, v in id2label.items()}
            kwargs["id2label"] = id2label
            kwargs["label2id"] = {v: k for k, v in id2label.items()}
            num_labels = num_labels or len(id2label)
        if num_labels:
            kwargs["num_labels"] = num_labels
            # A classifier checkpoint with another label count: its head is replaced (new labels, new head),
            # which transformers 5 refuses without this flag.
            kwargs["ignore_mismatched_sizes"] = num_labels != getattr(hf_config, "num_labels", num_labels)
        # Decoder-only classifiers pick the last non-pad token, so they need a pad id; reuse eos as the
        # tokenizer does (load_tokenizer).
        if getattr(hf_config, "pad_token_id", None) is None and getattr(hf_config, "eos_token_id", None) is not None:
            eos = hf_config.eos_token_id
            kwargs["pad_token_id"] = eos[0] if isinstance(eos, (list, tuple)) else eos
    auto_cls = getattr(transformers, AUTO_CLASSES[task_type])
    try:
        with _quiet_weight_loading():
            return auto_cls.from_pretrained(path, **kwargs)
    except OSError as err:
        raise ModelError([Problem("base_model", f"cannot load weights from {path}: {str(err).splitlines()[0]}",
                                  value=str(model_dir))]) from None


def _check_attention(name: str) -> None:
    import importlib.util

    import torch

    allowed = "auto, sdpa, eager, flash_attention_2"
    if name not in ("sdpa", "eager", "flash_attention_2"):
        raise ModelError([Problem("attn_implementation", "unknown attention implementation", value=name,
                                  allowed=allowed)])
    if name == "flash_attention_2" and (not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None):
        raise ModelError([Problem("attn_implementation", "flash_attention_2 needs a CUDA GPU and the flash-attn "
                                  "package", value=name, allowed=allowed, fix="use `sdpa` (or `auto`)")])


class _quiet_weight_loading:
    """transformers 5 draws a "Loading weights" progress bar for every from_pretrained: a dependency's internals in
    a run's output (issue 14). Off while loraforge loads a model, restored afterwards for the caller's own use."""

    def __enter__(self) -> None:
        from transformers.utils import logging as hf_logging

        self._was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc: object) -> None:
        from transformers.utils import logging as hf_logging

        if self._was_enabled:
            hf_logging.enable_progress_bar()
