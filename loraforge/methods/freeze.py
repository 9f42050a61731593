"""Freeze tuning: train some transformer blocks in full and freeze the rest (the "partial-parameter" fine-tuning
of ChatGLM-Efficient-Tuning / LLaMA-Factory). Cheaper than full fine-tuning; the last blocks carry most of the
task-specific change (Lee et al. 2019, "What would Elsa do? Freezing layers during transformer fine-tuning",
arXiv:1911.03090).

Which parameters train:
- blocks: `freeze_layer_indices` (exact indices, negative counts from the end), else `freeze_trainable_layers`
  (the last N blocks; negative: the first N), else the last 2 blocks unless `freeze_trainable_modules` alone
  chooses what trains;
- `freeze_trainable_modules` (regexes searched in parameter names): alone, every matching parameter trains;
  together with a block choice, only matching parameters inside the chosen blocks train (e.g. `mlp` of the last
  2 blocks);
- `freeze_train_embeddings` / `freeze_train_lm_head`: the input embeddings / the LM head (one tensor when the
  model ties them — then training either trains both, and `apply` says so);
- for SEQ_CLS / TOKEN_CLS / QUESTION_ANSWERING the task head is new and always trains.

Blocks are found generically: the outermost `nn.ModuleList`s whose items are all of one class (LLaMA
`model.layers`, GPT-2 `transformer.h`, BERT `encoder.layer`, T5 `encoder.block` + `decoder.block`). Encoder-decoder
models have two stacks; block indices apply to each.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loraforge.config.methods import FREEZE
from loraforge.errors import ConfigError, ModelError, Problem
from loraforge.methods.base import Method, ModelShape, ParamEstimate, layer_index

if TYPE_CHECKING:
    from torch import nn

    from loraforge.config import RunConfig
    from loraforge.methods.report import TrainableReport

DEFAULT_TRAINABLE_LAYERS = 2
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockStack:
    name: str  # e.g. "model.layers"
    size: int


def block_stacks(model: nn.Module) -> list[BlockStack]:
    """The transformer block lists of `model`: outermost ModuleLists of ≥ 1 items of a single class.

    Raises:
        ModelError: no such list (not a transformer model loraforge can freeze by blocks).
    """
    from torch import nn

    stacks: list[BlockStack] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1 or not any(True for _ in module[0].parameters()):
            continue
        if any(name.startswith(s.name + ".") for s in stacks):
            continue  # a list inside a block (T5's sub-layers, MoE experts)
        stacks.append(BlockStack(name, len(module)))
    if not stacks:
        raise ModelError([Problem("method", f"no list of transformer blocks found in {type(model).__name__}",
                                  value="freeze", fix="use `freeze_trainable_modules` regexes, or `method: lora`")])
    return stacks


def chosen_indices(cfg: RunConfig, depth: int) -> list[int] | None:
    """Block indices (0-based, sorted) to train, or None when no block choice applies (modules regex only).

    Raises:
        ConfigError: an index or count outside the model's blocks, naming the key, the value and the valid range.
    """
    if cfg.freeze_layer_indices is not None:
        bad = [i for i in cfg.freeze_layer_indices if not -depth <= i < depth]
        if bad:
            raise ConfigError([Problem("freeze_layer_indices", f"the model has {depth} blocks: no index {bad}",
                                       value=cfg.freeze_layer_indices, allowed=f"{-depth} … {depth - 1}",
                                       fix=f"use indices from 0 to {depth - 1} (or -1 for the last)")])
        return sorted({i % depth for i in cfg.freeze_layer_indices})
    n = cfg.freeze_trainable_layers
    if n is None:
        if cfg.freeze_trainable_modules:
            return None
        n = DEFAULT_TRAINABLE_LAYERS
    if abs(n) > depth:
        raise ConfigError([Problem("freeze_trainable_layers", f"the model has only {depth} blocks", value=n,
                                   allowed=f"{-depth} … {depth} (negative: the first N blocks)",
                                   fix=f"use at most {depth}, or `method: full` to train everything")])
    return list(range(depth - n, depth)) if n >= 0 else list(range(-n))


def config_depth(hf_config: Any) -> int | None:
    """Blocks per stack from config.json alone (the shorter stack of an encoder-decoder), or None if unknown."""
    get = hf_config.get if isinstance(hf_config, dict) else lambda k, d=None: getattr(hf_config, k, d)
    counts = [get(k) for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "num_decoder_layers",
                               "encoder_layers", "decoder_layers")]
    counts = [c for c in counts if isinstance(c, int) and c > 0]
    return min(counts) if counts else None


def check(cfg: RunConfig, hf_config: Any) -> list[Problem]:
    """Preflight problems from config.json alone: block indices / counts outside the model, bad regexes."""
    problems: list[Problem] = []
    try:
        _compile(cfg.freeze_trainable_modules or [])
    except ConfigError as err:
        problems += err.problems
    depth = config_depth(hf_config)
    if depth is not None:
        try:
            chosen_indices(cfg, depth)
        except ConfigError as err:
            problems += err.problems
    return problems


def _compile(patterns: list[str]) -> list[re.Pattern]:
    compiled, problems = [], []
    for i, pat in enumerate(patterns):
        try:
            compiled.append(re.compile(pat))
        except re.error as err:
            problems.append(Problem(f"freeze_trainable_modules[{i}]", f"not a valid regex: {err}", value=pat))
    if problems:
        raise ConfigError(problems)
    return compiled


def _head_prefixes(model: nn.Module, cfg: RunConfig) -> list[str]:
    """Top-level children besides the backbone that a non-LM task adds (score, classifier, qa_outputs…)."""
    from loraforge.config import TaskType

    if cfg.task_type not in (TaskType.SEQ_CLS, TaskType.TOKEN_CLS, TaskType.QUESTION_ANSWERING):
        return []
    backbone = getattr(model, "base_model_prefix", "")
    return [name for name, child in model.named_children()
            if name != backbone and any(True for _ in child.parameters())]


def trainable_names(model: nn.Module, cfg: RunConfig) -> set[str]:
    """Names (as in `named_parameters()`) of the parameters this config trains.

    Raises:
        ConfigError: out-of-range block choice, a bad regex, or a regex matching no parameter.
        ModelError: no block list found.
    """
    names = [n for n, _ in model.named_parameters()]
    patterns = _compile(cfg.freeze_trainable_modules or [])
    unused = [cfg.freeze_trainable_modules[i] for i, p in enumerate(patterns) if not any(p.search(n) for n in names)]
    if unused:
        raise ConfigError([Problem("freeze_trainable_modules", f"no parameter name matches {unused}", value=unused,
                                   fix="see the parameter names with `loraforge inspect MODEL`")])
    chosen: set[str] = set()
    stacks = block_stacks(model)
    depth = min(s.size for s in stacks)
    indices = chosen_indices(cfg, depth)
    if indices is None:
        chosen = {n for n in names if any(p.search(n) for p in patterns)}
    else:
        prefixes = tuple(f"{s.name}.{i}." for s in stacks for i in indices)
        chosen = {n for n in names if n.startswith(prefixes) and (not patterns or any(p.search(n) for p in patterns))}
    heads = tuple(p + "." for p in _head_prefixes(model, cfg))
    chosen |= {n for n in names if n.startswith(heads)}
    extra = []
    if cfg.freeze_train_embeddings and model.get_input_embeddings() is not None:
        extra.append(model.get_input_embeddings())
    if cfg.freeze_train_lm_head and model.get_output_embeddings() is not None:
        extra.append(model.get_output_embeddings())
    extra_ids = {id(p) for m in extra for p in m.parameters()}
    # named_parameters() lists a tied tensor once (under the embeddings' name), so match by identity.
    chosen |= {n for n, p in model.named_parameters() if id(p) in extra_ids}
    return chosen


def tied_embeddings(model: nn.Module) -> bool:
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    return inp is not None and out is not None and inp.weight is out.weight


def notes(model: nn.Module, cfg: RunConfig) -> list[str]:
    """Things the user should know about what trains (shown with the trainable report)."""
    out = []
    if tied_embeddings(model) and cfg.freeze_train_lm_head != cfg.freeze_train_embeddings:
        out.append("the model ties its LM head to the input embeddings: training "
                   f"{'the LM head' if cfg.freeze_train_lm_head else 'the embeddings'} trains both (one tensor)")
    return out


def apply(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """Set `requires_grad` so that exactly `trainable_names(model, cfg)` train.

    Raises:
        ConfigError, ModelError: see `trainable_names`.
    """
    keep = trainable_names(model, cfg)
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
    for note in notes(model, cfg):
        log.warning("freeze: %s", note)
    return model


def verify(report: TrainableReport, cfg: RunConfig) -> list[Problem]:
    """Something is frozen, every requested block trains, and embeddings / LM head train only when asked for
    (a tied LM head is the embeddings' tensor, so asking for either allows both)."""
    problems: list[Problem] = []
    kinds = report.trained_kinds
    if report.trainable == report.total:
        problems.append(Problem("freeze_trainable_layers", "every parameter is trainable: nothing was frozen",
                                value=cfg.freeze_trainable_layers, fix="check the freeze settings"))
    for i in cfg.freeze_layer_indices or []:
        if i >= 0 and not any(f".{i}." in n for n in report.trainable_names):
            problems.append(Problem("freeze_layer_indices", f"block {i} was asked for but none of its "
                                    "parameters is trainable", value=i, fix="check the block indices with "
                                    "`loraforge inspect MODEL`"))
    if not cfg.freeze_trainable_modules:  # regexes may legitimately select embeddings or the head
        asked = cfg.freeze_train_embeddings or cfg.freeze_train_lm_head
        if "embeddings" in kinds and not asked:
            problems.append(Problem("freeze_train_embeddings", "the input embeddings are trainable but were not "
                                    "asked for", value=False, fix="this is a bug in the method setup; please report it"))
        if "lm_head" in kinds and not asked:
            problems.append(Problem("freeze_train_lm_head", "the LM head is trainable but was not asked for",
                                    value=False, fix="this is a bug in the method setup; please report it"))
    return problems


def estimate_params(cfg: RunConfig, shape: ModelShape) -> ParamEstimate:
    """Base parameters a freeze config trains, from names alone: chosen blocks, regex-matched parameters,
    embeddings, LM head."""
    n_layers = shape.dims["layers"]
    params = shape.params
    if cfg.freeze_layer_indices is not None:
        chosen = {i % n_layers for i in cfg.freeze_layer_indices} if n_layers else set()
    else:
        n = cfg.freeze_trainable_layers
        if n is None:
            n = 0 if cfg.freeze_trainable_modules else DEFAULT_TRAINABLE_LAYERS
        chosen = set(range(n_layers - n, n_layers)) if n > 0 else set(range(0, -n))
    names = {n for n in params if layer_index(n) in chosen}
    for pattern in cfg.freeze_trainable_modules or []:
        rx = re.compile(pattern)
        names |= {n for n in params if rx.search(n)}
    if cfg.freeze_train_embeddings:
        names |= {n for n in params if re.search(r"(embed_tokens|wte|word_embeddings|shared)\.", n)}
    if cfg.freeze_train_lm_head:
        names |= {n for n in params if re.search(r"(lm_head|embed_out|output_layer)\.", n)}
    return ParamEstimate(trainable_base=frozenset(names))


METHOD = Method(
    options=FREEZE,
    apply=apply,
    saves_adapter=False,
    estimate_params=estimate_params,
    verify=verify,
    check=check,
)
