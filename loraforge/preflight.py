"""Checks that need the model's config (not its weights) and the data, run before any training.

`loraforge validate` runs exactly this; `loraforge train` runs it first. Every problem — data files and lines,
task type vs architecture, target modules vs the real module names (from a meta-device build), method-specific
rules, packing safety, precision — is collected and reported together, so one run of `validate` lists every
mistake. Nothing here reads model weights: a folder with only config.json and tokenizer files validates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from loraforge.config import RunConfig, TaskType
from loraforge.errors import LoraforgeError, Problem


class PreflightError(LoraforgeError):
    title = "preflight found problems (nothing was trained)"


@dataclass
class PreflightReport:
    """What preflight learned; printed as a short summary by `validate`.

    Attributes:
        model_dir: the resolved model folder.
        model_type: `model_type` from config.json (`llama`).
        kind: decoder-only, encoder-decoder or encoder-only.
        target_modules: what LoRA will adapt (the family default when the config leaves it out).
        batching: the batching the trainer will use (`auto` resolved).
        data_stats: the data teammate's `DataStats` (example count, token-length percentiles, overlong count).
        notes: facts worth knowing that are not errors (e.g. the folder has no weights yet).
        advice: a choice in the config that works but costs the user (attention-only targets), with the change.
    """

    model_dir: Path | None = None
    model_type: str = "?"
    kind: str = "?"
    target_modules: list[str] | str | None = None
    batching: str | None = None
    data_stats: Any = None
    notes: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)

    def summary(self, cfg: RunConfig) -> str:
        line = f"preflight OK: {self.model_type} ({self.kind}), task {cfg.task_type.value}, method {cfg.method}"
        if self.target_modules:
            line += f", target_modules {self.target_modules}"
        if self.batching:
            line += f", batching {self.batching}"
        return "\n".join([line] + [f"note: {n}" for n in self.notes] + self.advice)


def run_preflight(cfg: RunConfig, echo: Callable[[str], None] = print, *, show_data: bool = True) -> PreflightReport:
    """Check the model config, the method and the data against `cfg` without loading weights.

    Model-side and data-side checks run independently, so a missing model dir and a bad data line are
    reported in the same error. `show_data=False` leaves the data statistics out (`train` prints them itself).

    Raises:
        PreflightError: every problem found, each naming its key (or file:line), value, what is allowed and the fix.
    """
    problems: list[Problem] = []
    report = PreflightReport()
    if cfg.task_type is TaskType.TEXT_TO_IMAGE:
        # A Stable Diffusion run: its own recipe checks data, pipeline layout and UNet targets (no weights).
        from loraforge.image.preflight import check_image_run

        problems = check_image_run(cfg) + _output_safety(cfg)
        if problems:
            raise PreflightError(problems)
        report.model_type, report.kind = "stable-diffusion", "text-to-image"
        echo(report.summary(cfg))
        return report
    hf_config = _collect(problems, _model_checks, cfg, report)
    if hf_config is not None:
        problems += _collect(problems, _method_checks, cfg, hf_config) or []
        problems += _stage_checks(cfg)
        _collect(problems, _batching_check, cfg, report)
    problems += _precision_problems(cfg)
    problems += _sharding_problems(cfg)
    problems += _output_problems(cfg)
    _collect(problems, _data_checks, cfg, report, model_ok=hf_config is not None)
    if problems:
        raise PreflightError(_dedupe(problems))
    echo(report.summary(cfg))
    if show_data and report.data_stats is not None:
        from loraforge.data.checks import format_stats

        echo(format_stats(report.data_stats))
    return report


def _collect(problems: list[Problem], check: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run one check; a LoraforgeError it raises adds its problems instead of stopping the others."""
    try:
        return check(*args, **kwargs)
    except LoraforgeError as err:
        problems += err.problems
        return None


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen: set[tuple[str, str]] = set()
    out = []
    for p in problems:
        if (p.key, p.message) not in seen:
            seen.add((p.key, p.message))
            out.append(p)
    return out


# ------------------------------------------------------------------------------------------------ model side

def _model_checks(cfg: RunConfig, report: PreflightReport) -> Any:
    """Resolve the model, read its config, check the task type and target_modules. Returns the HF config,
    or raises with every model-side problem."""
    from loraforge.models.discovery import (check_target_modules, is_remote_placeholder, load_hf_config,
                                           remote_code_problem, try_meta_model)
    from loraforge.models.fit import adapter_fit_problems, weights_problems
    from loraforge.models.gguf import resolve_model_path
    from loraforge.models.registry import check_task_type, model_kind
    from loraforge.models.targets import attention_only_advice, resolve_target_modules

    model_dir = resolve_model_path(cfg.base_model)
    hf_config = load_hf_config(model_dir, cfg.trust_remote_code)
    report.model_dir = model_dir
    report.model_type = str(getattr(hf_config, "model_type", "?"))
    report.kind = model_kind(hf_config)
    problems = check_task_type(hf_config, cfg.task_type)
    if is_remote_placeholder(hf_config):
        # Its modelling code cannot run here: training could not even build the model.
        problems.append(remote_code_problem(hf_config, cfg.trust_remote_code))
    if not problems and _uses_target_modules(cfg) and cfg.init_adapter is None:
        meta = try_meta_model(hf_config, cfg.task_type, trust_remote_code=cfg.trust_remote_code)
        problems += check_target_modules(hf_config, meta, cfg.target_modules)
        if not problems:
            report.target_modules = resolve_target_modules(hf_config, meta, cfg.target_modules)
            advice = attention_only_advice(meta, report.target_modules) if cfg.target_modules is not None else None
            report.advice += [advice] if advice else []
    if cfg.init_adapter is not None and not (Path(cfg.init_adapter) / "adapter_config.json").is_file():
        problems.append(Problem("init_adapter", "not an adapter folder (no adapter_config.json)",
                                value=str(cfg.init_adapter), allowed="a folder written by `loraforge train`",
                                fix="point init_adapter at a finished run's output_dir"))
    problems += _converted_checks(cfg, hf_config, model_dir, report)
    if cfg.init_adapter is not None and (Path(cfg.init_adapter) / "adapter_config.json").is_file():
        problems += adapter_fit_problems(Path(cfg.init_adapter), model_dir, key="init_adapter")
    problems += weights_problems(model_dir)  # a truncated weights file, from its header (no weights read)
    if not _has_weights(model_dir):
        report.notes.append(f"{model_dir} has no weight files yet: validation needs none, training will")
    if problems:
        raise PreflightError(problems)
    return hf_config


def _converted_checks(cfg: RunConfig, hf_config: Any, model_dir: Path, report: PreflightReport) -> list[Problem]:
    """A base converted from an old remote-code layout: say so, translate its original target names, and refuse
    what the converted model cannot do like the original (Qwen-1 beyond seq_length)."""
    from loraforge.models.native import family_of_converted, import_record, translate_targets

    fam = family_of_converted(hf_config)
    if fam is None:
        return []
    rec = import_record(model_dir) or {}
    report.notes.append(f"{rec.get('source', cfg.base_model)} ({rec.get('variant', fam.name)}) runs as its native "
                        f"{fam.native_architecture} conversion in {model_dir}")
    report.notes += rec.get("notes", [])
    report.notes += translate_targets(hf_config, cfg.target_modules)[1]
    native = hf_config.to_dict()
    from loraforge.models.native.capabilities import method_notes, task_notes

    task = getattr(cfg.task_type, "value", cfg.task_type)
    said = method_notes(fam, native, rec.get("original_config") or {}).get(cfg.method)
    report.notes += [f"method {cfg.method} on the converted model: {said}"] if said else []
    report.notes += [f"task_type {task}: {task_notes(hf_config)[task]}"] if task in task_notes(hf_config) else []
    problems = []
    limit = fam.seq_limit(native)
    if limit and cfg.cutoff_len > limit[0]:
        problems.append(Problem("cutoff_len", f"longer than the checkpoint's seq_length: {limit[1]}",
                                value=cfg.cutoff_len, allowed=f"≤ {limit[0]}", fix=f"set `cutoff_len: {limit[0]}`"))
    return problems


def _has_weights(model_dir: Path) -> bool:
    return any(any(model_dir.glob(g)) for g in ("*.safetensors", "*.bin", "*.gguf"))


def _uses_target_modules(cfg: RunConfig) -> bool:
    from loraforge.methods import METHODS

    method = METHODS.get(cfg.method)
    return method is not None and method.uses_target_modules


def _method_checks(cfg: RunConfig, hf_config: Any) -> list[Problem]:
    """The method record's own preflight `check(cfg, hf_config) -> list[Problem]`."""
    from loraforge.methods import method_for

    return _layer_index_problems(cfg, hf_config) + list(method_for(cfg).check(cfg, hf_config))


def _layer_index_problems(cfg: RunConfig, hf_config: Any) -> list[Problem]:
    """Layer indices the model does not have would adapt (or train) nothing there, silently."""
    n = next((v for k in ("num_hidden_layers", "n_layer", "num_layers")
              if isinstance(v := getattr(hf_config, k, None), int)), None)
    allowed = f"0 to {n - 1} (the model has {n} layers)" if n else "indices >= 0"
    value = cfg.layers_to_transform  # (freeze_layer_indices, which may count from the end, is checked by freeze)
    indices = [value] if isinstance(value, int) else list(value or [])
    bad = [i for i in indices if i < 0 or (n is not None and i >= n)]
    if not bad:
        return []
    return [Problem("layers_to_transform", f"layer index {bad[0]} does not exist", value=value, allowed=allowed,
                    fix="use indices from `loraforge inspect MODEL`, or leave the key out for all layers")]


def _stage_checks(cfg: RunConfig) -> list[Problem]:
    """A preference `stage` needs a causal LM and the per-token log-probs of the chunked LM head: methods that
    inject virtual tokens (prefix, P-tuning, prompt tuning) change PEFT's forward, so they are refused."""
    from loraforge.config.methods import METHOD_OPTIONS

    if cfg.dpo_sft_weight and cfg.stage != "dpo":
        return [Problem("dpo_sft_weight", f"adds an SFT term to the DPO loss, but the stage is `{cfg.stage}`",
                        value=cfg.dpo_sft_weight, allowed="stage: dpo",
                        fix="set `stage: dpo`, or remove dpo_sft_weight (orpo already trains the chosen NLL)")]
    if cfg.stage == "sft":
        return []
    if cfg.task_type is not TaskType.CAUSAL_LM:
        return [Problem("stage", "preference stages train causal LMs only", value=cfg.stage,
                        allowed=f"sft with task_type {cfg.task_type.value}", fix="set `task_type: CAUSAL_LM`")]
    if cfg.pref_reference == "precomputed" and cfg.stage == "kto":
        return [Problem("pref_reference", "KTO's reference point uses mismatched pairs formed per micro-batch, which "
                        "cannot be precomputed per example", value="precomputed", allowed="auto, copy",
                        fix="use `pref_reference: auto`")]
    options = METHOD_OPTIONS.get(cfg.method)
    if options is not None and options.packing_unsafe is not None:
        return [Problem("method", f"`stage: {cfg.stage}` does not train methods with virtual tokens: PEFT's forward "
                        "injects them, so neither the chunked LM head's per-sequence log-probs nor packing a pair's "
                        "two sides into one row applies", value=cfg.method, allowed="lora, qlora, freeze, full",
                        fix="use `method: lora` (or train this method with `stage: sft`)")]
    return []


def _batching_check(cfg: RunConfig, report: PreflightReport) -> None:
    """The trainer's own packing-safety rule (`data.batching.choose_batching`), so `validate` refuses what `train`
    would."""
    from loraforge.data.batching import choose_batching

    if cfg.task_type is TaskType.TEXT_TO_IMAGE or report.model_dir is None:
        return
    report.batching = choose_batching(cfg, report.model_dir)


def _sharding_problems(cfg: RunConfig) -> list[Problem]:
    """`sharding: fsdp2` with a method or option FSDP2 cannot run: said before any process starts."""
    if getattr(cfg, "sharding", "ddp") != "fsdp2":
        return []
    from loraforge.train.sharding_checks import fsdp_problems

    return fsdp_problems(cfg)


def _precision_problems(cfg: RunConfig) -> list[Problem]:
    """fp16 mixed precision needs CUDA (the trainer would refuse it after loading the model)."""
    if cfg.precision != "fp16":
        return []
    import torch

    if torch.cuda.is_available():
        return []
    return [Problem("precision", "fp16 mixed precision needs a CUDA GPU, and none is available", value="fp16",
                    allowed="auto, fp32, bf16", fix="use `precision: bf16` (or auto) on CPU")]


def _output_safety(cfg: RunConfig) -> list[Problem]:
    """output_dir is not (inside) the base or another model folder, can be written, and no live run holds it."""
    from loraforge.train.lock import holder, holder_problem, is_main_process
    from loraforge.train.rundir import base_model_dirs, output_dir_problems

    unsafe = output_dir_problems(cfg.output_dir, base_model_dirs(cfg.base_model))
    # only the main process takes the lock (`holds_output_dir`); the other ranks of its job would see it held
    who = None if unsafe or not is_main_process() else holder(cfg.output_dir)
    return unsafe + ([holder_problem(cfg.output_dir, who)] if who is not None else [])


def _resume_fit(ckpt: Path, cfg: RunConfig) -> list[Problem]:
    """The checkpoint belongs to this run's base model (same architecture; adapter shapes and coverage)."""
    from loraforge.models.fit import checkpoint_fit_problems
    from loraforge.models.gguf import resolve_model_path

    problems: list[Problem] = []
    model_dir = _collect(problems, resolve_model_path, cfg.base_model)
    return checkpoint_fit_problems(ckpt, model_dir) if model_dir is not None else []


def _output_problems(cfg: RunConfig) -> list[Problem]:
    """The run-dir rules of the trainer (`train/setup.py:prepare_run_dir`, `train/lock.py`), checked read-only:
    never into a model folder, one run at a time, resuming needs a checkpoint, and a finished run is not
    overwritten by accident."""
    from loraforge.train.checkpoint import STATE_FILE, list_checkpoints
    from loraforge.train.manifest import require_intact, resumable_checkpoint
    from loraforge.train.rundir import RUN_ARTIFACTS

    run_dir = Path(cfg.output_dir)
    unsafe = _output_safety(cfg)
    if unsafe:
        return unsafe
    found = [p.name for p in list_checkpoints(run_dir)] if run_dir.is_dir() else []
    if cfg.resume_from_checkpoint == "latest":
        ckpt = resumable_checkpoint(run_dir, warn=lambda _m: None) if run_dir.is_dir() else None
        if ckpt is None:
            return [Problem("resume_from_checkpoint", f"no complete checkpoint in {run_dir}", value="latest",
                            allowed="`latest` when output_dir holds a checkpoint-N folder",
                            fix="remove resume_from_checkpoint to start a new run (or fix output_dir)")]
        return _resume_fit(ckpt, cfg)
    if cfg.resume_from_checkpoint:
        if not (Path(cfg.resume_from_checkpoint) / STATE_FILE).is_file():
            return [Problem("resume_from_checkpoint", "not a complete loraforge checkpoint",
                            value=cfg.resume_from_checkpoint, allowed=f"`latest` or one of: {', '.join(found) or 'none'}",
                            fix="point at a checkpoint-N folder of a previous run")]
        problems: list[Problem] = []
        _collect(problems, require_intact, Path(cfg.resume_from_checkpoint))
        return problems or _resume_fit(Path(cfg.resume_from_checkpoint), cfg)
    previous = [a for a in RUN_ARTIFACTS if (run_dir / a).exists()] + found if run_dir.is_dir() else []
    if previous and not cfg.overwrite_output_dir:
        return [Problem("output_dir", f"already holds a training run ({', '.join(previous[:3])})", value=str(run_dir),
                        allowed="an empty or new folder, or overwrite_output_dir: true",
                        fix="continue it with `resume_from_checkpoint: latest`, start over with "
                            "`overwrite_output_dir: true`, or pick another output_dir")]
    return []


# ------------------------------------------------------------------------------------------------- data side

def _data_checks(cfg: RunConfig, report: PreflightReport, *, model_ok: bool) -> None:
    """Every file and line of the training (and validation) data; with a usable tokenizer, also tokenize with
    the training template to count overlong examples and report token-length percentiles."""
    from loraforge.data.formats import load_conversations, read_rows, resolve_train_files

    def check_rows(paths: list[Path]) -> None:
        # Chat/alpaca rows are checked line by line without a tokenizer; the other task types have their own row
        # shapes (text/label, tokens/tags…), whose lines `build_datasets` checks below — here only the parse.
        if cfg.stage != "sft":
            from loraforge.data.preference import load_preference_rows

            _collect(problems, load_preference_rows, paths, cfg)
        elif cfg.task_type is TaskType.CAUSAL_LM:
            _collect(problems, load_conversations, paths, cfg.system_prompt)
        else:
            for path in paths:
                _collect(problems, read_rows, path)

    problems: list[Problem] = []
    files = _collect(problems, resolve_train_files, cfg)
    if files:
        check_rows(files)
    if cfg.val_file is not None:
        if not Path(cfg.val_file).is_file():
            problems.append(Problem("val_file", "validation data file not found", value=str(cfg.val_file),
                                    allowed="an existing .jsonl / .json / .csv file",
                                    fix="fix the path, or use `val_size: 0.1` to hold out training rows"))
        else:
            check_rows([Path(cfg.val_file)])
    if problems:
        raise PreflightError(problems)
    if not model_ok or report.model_dir is None:
        return
    from loraforge.models.loader import load_tokenizer
    from loraforge.objectives import build_data

    tokenizer = load_tokenizer(report.model_dir, trust_remote_code=cfg.trust_remote_code)
    report.data_stats = build_data(cfg, tokenizer).stats
