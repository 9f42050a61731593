"""The record every method module exports, and the small types its hooks speak.

A method's knowledge lives in one place: `loraforge/methods/<name>.py` builds a `Method` and `methods/__init__.py`
lists it in `METHODS`. Everything else — the trainer's setup, preflight, `estimate`, `export`, the CLI and the
contract test — asks the record (`METHODS[cfg.method].saves_adapter`, `.check(...)`, `.training_steps`…)
instead of comparing `cfg.method` with a name. The config side of a method (default learning rate, owned keys,
cross-field rules, packing) is its `options`, defined in `loraforge/config/methods.py` because the config
package may not import this one.

Nothing here imports torch: `import loraforge.methods` stays cheap for the CLI and the config checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

if TYPE_CHECKING:
    from torch import nn

    from loraforge.config import RunConfig
    from loraforge.config.methods import MethodOptions
    from loraforge.errors import Problem
    from loraforge.methods.report import TrainableReport


@dataclass(frozen=True)
class ModelShape:
    """What a method's parameter estimate may look at: a meta-device build of the model, summarized.

    Attributes:
        hf_config: the model's transformers config.
        model: the meta-device model (no memory; for resolving `target_modules` the way training will).
        params: parameter name → element count, each tied/shared tensor once.
        linears: the linear layers: dicts with `name`, `leaf`, `in`, `out`, `group` (`attention`, `mlp`,
            `head`…), `numel` and `layer` (block index or None).
        dims: `hidden`, `layers`, `heads`, `q_dim`, `kv_dim`, `intermediate`, `vocab`, `gated`.
        weight_bytes: bytes per base weight at its storage dtype.
    """

    hf_config: Any
    model: Any
    params: Mapping[str, int]
    linears: Sequence[Mapping[str, Any]]
    dims: Mapping[str, int]
    weight_bytes: int


@dataclass(frozen=True)
class ParamEstimate:
    """A method's answer to "what trains, and what does it add?", before any weight is loaded.

    Attributes:
        trainable_base: names (as in `ModelShape.params`) of base parameters that train.
        new_params: parameters the method adds (adapter weights, prompt encoders, trained copies).
        adapted: the linears wrapped with an adapter (their inputs are kept for backward).
        weights_bytes: storage of the base weights when it is not `params × weight_bytes` (a quantized base).
        every_layer_needs_grad: the autograd graph spans every layer (full fine-tuning; virtual tokens make
            every layer's input need gradients), not only the layers from the first trainable one on.
        fused_lm_head: the fused chunked LM-head loss applies (False when PEFT's forward injects virtual tokens).
        frozen_linears_in_compute_dtype: training stores the frozen linears in the 16-bit compute dtype (LoRA's
            `cast_frozen`), so autocast makes no per-use copies of them.
        lean_blocks: training runs the fused LoRA linears and decoder blocks (`lora_fused`, `lora_blocks`), which
            keep no linear's input: the norm outputs, the gated product and the attention output are recomputed.
    """

    trainable_base: frozenset[str] = frozenset()
    new_params: int = 0
    adapted: tuple[Mapping[str, Any], ...] = ()
    weights_bytes: int | None = None
    every_layer_needs_grad: bool = False
    fused_lm_head: bool = True
    frozen_linears_in_compute_dtype: bool = False
    lean_blocks: bool = False


@dataclass(frozen=True)
class TrainingContext:
    """What a post-build training step may depend on besides the config.

    Attributes:
        precision: the resolved precision of the run (`fp32`, `bf16`, `fp16`).
        compute_dtype: the autocast dtype (`torch.bfloat16` / `torch.float16`), None for fp32.
    """

    precision: str
    compute_dtype: Any = None


# A training-only change to the built model (fused kernels, weight casts). The saved adapter or model must stay
# exactly what `apply` produced: these steps change how training computes, never what is saved.
TrainingStep = Callable[["nn.Module", "RunConfig", TrainingContext], None]


def no_load_kwargs(cfg: RunConfig, hf_config: Any = None) -> dict[str, Any]:
    """The base model loads as usual."""
    return {}


def no_problems(cfg: RunConfig, hf_config: Any) -> list[Problem]:
    """No method-specific preflight rule."""
    return []


def no_trainable_rule(report: TrainableReport, cfg: RunConfig) -> list[Problem]:
    """No method-specific rule on what trains (`verify_trainable` still refuses a model where nothing trains)."""
    return []


@dataclass(frozen=True)
class Method:
    """Everything loraforge knows about one fine-tuning method.

    Attributes:
        options: the config side (`name`, `default_learning_rate`, owned `keys`, `rules`, `packing_unsafe`).
        apply: `(model, cfg) -> model` to train, with exactly the intended parameters requiring grad.
        saves_adapter: the run dir is a PEFT adapter (else a complete transformers model).
        estimate_params: `(cfg, ModelShape) -> ParamEstimate` for `loraforge estimate` (no weights loaded).
        verify: `(TrainableReport, cfg) -> problems` on the built model: what trains is what the config asked for.
        load_kwargs: `(cfg, hf_config) -> keyword arguments for models.loader.load_model` (quantization, native
            prefix encoder); they win over the config's `dtype` / `attn_implementation` (a method may load its
            frozen base in the compute dtype).
        check: `(cfg, hf_config) -> problems` for preflight, from config.json alone (combinations known broken).
        training_steps: post-build, training-only changes, run in order after `apply` (see `TrainingStep`).
        uses_target_modules: `target_modules` picks the adapted layers (preflight checks them on the real module
            names; `inspect`-style reports show them).
        quantizes_base: the base is loaded quantized, so a merge goes into an unquantized copy of it.
    """

    options: MethodOptions
    apply: Callable[[nn.Module, RunConfig], nn.Module]
    saves_adapter: bool
    estimate_params: Callable[[RunConfig, ModelShape], ParamEstimate]
    verify: Callable[[TrainableReport, RunConfig], list[Problem]] = no_trainable_rule
    load_kwargs: Callable[[RunConfig, Any], dict[str, Any]] = no_load_kwargs
    check: Callable[[RunConfig, Any], list[Problem]] = no_problems
    training_steps: tuple[TrainingStep, ...] = field(default=())
    uses_target_modules: bool = False
    quantizes_base: bool = False

    @property
    def name(self) -> str:
        return self.options.name

    @property
    def default_learning_rate(self) -> float:
        return self.options.default_learning_rate

    @property
    def owned_keys(self) -> tuple[str, ...]:
        return self.options.keys


def layer_index(name: str) -> int | None:
    """The block index in a parameter or module name (`model.layers.3.mlp` → 3), None outside the blocks."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None
