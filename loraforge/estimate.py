"""`loraforge estimate`: trainable/total parameters and the peak memory of a training run, before running it.

Parameters are counted on a meta-device build of the model (no memory, any size); LoRA parameters come from the
shapes of the layers the config really adapts. Peak memory is the sum of:

* weights — every base parameter at its storage dtype (4-bit / 8-bit for QLoRA linears);
* trainable state — fp32 adapter weights, their gradients and AdamW's two moments (PyTorch keeps the moments in
  the parameter's dtype);
* activations — what autograd keeps from forward to backward, per token and per layer, for the tokens of one
  micro-batch (formula in `_layer_bytes_per_token`), reduced by gradient checkpointing to one saved input per
  layer plus one layer's worth recomputed;
* autocast weight copies — under bf16/fp16 autocast every frozen fp32 linear weight is cast per use, and the
  cast copy is kept for backward once activations need gradients;
* the loss — with `chunked_loss` only one chunk of `[tokens × vocab]` logits exists at a time
  (see `loraforge/train/loss.py`); without it the full logits, their fp32 copy, log-softmax and gradient;
* framework overhead — the measured RSS of a Python process that has imported torch, transformers, peft and
  accelerate and loaded the tokenizer (on CUDA: a CUDA context instead).

On CPU the result is the process RSS; on CUDA the GPU memory. Weights of a safetensors checkpoint are memory-
mapped by transformers, so they are counted once (not twice during loading).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from loraforge.config import RunConfig, TaskType
from loraforge.methods.base import ModelShape, ParamEstimate, layer_index

if TYPE_CHECKING:
    from torch import nn

MiB = 2**20
# glibc malloc keeps freed blocks of the per-step graph, so RSS exceeds the sum of live tensors. Fitted on SmolLM2
# LoRA runs on a 2-core CPU (batch 4, 800–1024 tokens): with 15% of the per-step memory the estimate was +1.4%
# of the measured peak for the real training loop in fp32 and -10% for a bf16-autocast loop.
ALLOCATOR_SLACK = 0.15
CUDA_CONTEXT_BYTES = 500 * MiB
LOSS_CHUNK_TOKENS = 128  # = loraforge.train.loss.DEFAULT_CHUNK_TOKENS (not imported: no torch here)


@dataclass
class Estimate:
    """The numbers `loraforge estimate` prints (bytes and parameter counts)."""

    model_type: str
    method: str
    device: str
    precision: str
    total_params: int
    trainable_params: int
    adapted_modules: list[str]
    tokens_per_batch: int
    length_source: str
    weights_bytes: int
    trainable_state_bytes: int
    activation_bytes: int
    weight_cast_bytes: int
    loss_bytes: int
    overhead_bytes: int
    slack_bytes: int
    notes: list[str] = field(default_factory=list)
    processes: int = 1
    sharding: str = "ddp"
    reference_bytes: int = 0  # a preference stage's frozen reference copy (0: adapter disabled, or none needed)

    @property
    def peak_bytes(self) -> int:
        return (self.weights_bytes + self.trainable_state_bytes + self.activation_bytes + self.weight_cast_bytes
                + self.loss_bytes + self.overhead_bytes + self.slack_bytes + self.reference_bytes)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)


def estimate_memory(cfg: RunConfig, *, baseline_bytes: int | None = None, device: str | None = None,
                    processes: int = 1, sharding: str | None = None) -> Estimate:
    """Estimate parameters and peak training memory for `cfg` without loading weights.

    What trains and what the method adds come from the method's record (`Method.estimate_params`); the memory
    terms from the shapes, the data and the precision.

    Args:
        cfg: the run config.
        baseline_bytes: framework overhead to use instead of measuring it in a fresh Python process.
        device: `cpu` or `cuda` (default: cuda when available).
        processes: how many processes share the run (the estimate is per process).
        sharding: `ddp` (each process holds the whole model) or `fsdp2` (default: the config's `sharding`).
            Under FSDP2 each process keeps 1/N of every weight, gradient and AdamW moment, plus the whole
            weights that are gathered at a time: the root's (embeddings, final norm, LM head — all of a step
            long, since the loss module is the root) and two decoder layers (the current and the prefetched).
            Activations are per process and do not shrink. Under DDP each process holds everything, plus a
            second copy of the gradients in DDP's all-reduce buckets.

    Raises:
        ModelError / PreflightError / ConfigError: the model cannot be resolved or does not fit the config.
    """
    import torch

    from loraforge.methods import method_for
    from loraforge.models.gguf import resolve_model_path
    from loraforge.train.precision import resolve_precision

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_dir = resolve_model_path(cfg.base_model)
    shape = model_shape(cfg, model_dir, device)
    precision = resolve_precision(cfg.precision) if device == "cpu" or cfg.precision != "auto" else \
        ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    method = method_for(cfg).estimate_params(cfg, shape)
    params, dims, w_bytes = shape.params, shape.dims, shape.weight_bytes
    adapted = list(method.adapted)
    trainable_base = sum(params[n] for n in method.trainable_base)
    total = sum(params.values())
    weights = method.weights_bytes if method.weights_bytes is not None else total * w_bytes
    # Adapter / prompt weights are fp32 (PEFT keeps them so); base parameters that train use their own dtype.
    state = method.new_params * (4 + 4 + 8) + trainable_base * (w_bytes + 2 * w_bytes)

    tokens, labelled, source = _tokens_per_batch(cfg, model_dir)
    act_bytes = 2 if precision in ("bf16", "fp16") else 4
    activations, casts = _activation_bytes(cfg, shape, method, tokens, act_bytes)
    loss = _loss_bytes(cfg, dims, tokens, labelled, act_bytes, fused=method.fused_lm_head)
    overhead = CUDA_CONTEXT_BYTES if device == "cuda" else (baseline_bytes if baseline_bytes is not None
                                                            else measure_baseline_rss(model_dir))
    slack = int(ALLOCATOR_SLACK * (activations + casts + loss + state))
    est = Estimate(
        model_type=str(getattr(shape.hf_config, "model_type", "?")), method=cfg.method, device=device,
        precision=precision, total_params=total + method.new_params,  # PEFT counts adapter weights in the total
        trainable_params=trainable_base + method.new_params, adapted_modules=sorted({l["leaf"] for l in adapted}),
        tokens_per_batch=tokens, length_source=source, weights_bytes=int(weights), trainable_state_bytes=state,
        activation_bytes=int(activations), weight_cast_bytes=casts, loss_bytes=int(loss), overhead_bytes=overhead,
        slack_bytes=slack,
    )
    sharding = sharding or cfg.sharding
    est.processes, est.sharding = processes, sharding
    if sharding == "fsdp2" and processes > 1:
        layer_sizes: dict[int, int] = {}
        root = 0
        for name, n in params.items():
            i = layer_index(name)
            if i is None:
                root += n
            else:
                layer_sizes[i] = layer_sizes.get(i, 0) + n
        gathered = (root + 2 * max(layer_sizes.values(), default=0)) * w_bytes
        est.weights_bytes = int(weights / processes + min(gathered, weights) * (processes - 1) / processes)
        est.trainable_state_bytes = state // processes
        est.notes.append(f"FSDP2 over {processes} processes: per-process figures (each holds 1/{processes} of the "
                         f"weights and trainable state, plus {gathered / MiB:,.0f} MiB gathered at a time)")
    elif processes > 1:
        # DDP's reducer copies every gradient into its flat all-reduce buckets (accelerate keeps torch's default
        # gradient_as_bucket_view=False): a second copy of the gradients (measured: +460 MiB on SmolLM2 full
        # fine-tuning, whose gradients are 513 MiB; benchmarks/fsdp_memory.py)
        buckets = method.new_params * 4 + trainable_base * w_bytes
        est.trainable_state_bytes += buckets
        est.notes.append(f"DDP over {processes} processes: each holds the whole model, plus DDP's gradient buckets "
                         f"({buckets / MiB:,.0f} MiB, in grads + AdamW state); figures are per process")
    if cfg.attn_implementation == "eager":
        est.notes.append("eager attention keeps [heads × T × T] scores per layer: included in activations")
    _reference_cost(cfg, est)
    return est


def _reference_cost(cfg: RunConfig, est: Estimate) -> None:
    """A preference stage's reference model: a frozen copy of the weights, or nothing (adapter disabled,
    precomputed log-probs, orpo/simpo); its forward runs without grad, so it adds no kept activations."""
    if cfg.stage == "sft":
        return
    from loraforge.objectives import objective_for
    from loraforge.objectives.preference import uses_adapter_as_reference

    needs = objective_for(cfg).name in ("dpo", "kto")
    if not needs:
        est.notes.append(f"stage {cfg.stage}: no reference model")
    elif cfg.pref_reference == "precomputed":
        est.notes.append(f"stage {cfg.stage}: reference log-probs precomputed in one pass before training (no copy)")
    elif uses_adapter_as_reference(cfg):
        est.notes.append(f"stage {cfg.stage}: the reference is the base with the adapter disabled (no copy)")
    else:
        est.reference_bytes = est.weights_bytes
        est.notes.append(f"stage {cfg.stage}: a frozen reference copy of the model ({est.weights_bytes / MiB:,.0f} "
                         "MiB) is included in the total")


def model_shape(cfg: RunConfig, model_dir: Path, device: str) -> ModelShape:
    """The meta-device build of the model, summarized for the method's estimate (no weights read)."""
    from loraforge.models.discovery import load_hf_config, meta_model

    hf_config = load_hf_config(model_dir, cfg.trust_remote_code)
    task = cfg.task_type if cfg.task_type is not TaskType.TEXT_TO_IMAGE else TaskType.CAUSAL_LM
    model = meta_model(hf_config, task, trust_remote_code=cfg.trust_remote_code)
    # the dtype the base really loads in: a method may load its frozen base in the compute dtype
    from loraforge.methods import method_for

    load_dtype = method_for(cfg).load_kwargs(cfg, hf_config).get("dtype", cfg.torch_dtype)
    load_dtype = load_dtype if isinstance(load_dtype, str) else cfg.torch_dtype
    return ModelShape(hf_config=hf_config, model=model, params=_unique_params(model), linears=_linears(model),
                      dims=_dims(hf_config), weight_bytes=_dtype_bytes(load_dtype, device))


def _activation_bytes(cfg: RunConfig, shape: ModelShape, method: ParamEstimate, tokens: int,
                      act_bytes: int) -> tuple[int, int]:
    """(activations autograd keeps for one micro-batch, autocast copies of frozen linear weights)."""
    dims, w_bytes, linears = shape.dims, shape.weight_bytes, shape.linears
    adapted, trainable_names = list(method.adapted), set(method.trainable_base)
    layers_with_graph = _layers_with_graph(dims, adapted, trainable_names, all_layers=method.every_layer_needs_grad)
    per_layer = _layer_bytes_per_token(cfg, dims, adapted, linears, trainable_names, act_bytes,
                                       lean_blocks=method.lean_blocks)
    if cfg.gradient_checkpointing:
        # Each layer keeps only its input; backward recomputes one layer at a time.
        activations = tokens * (layers_with_graph * dims["hidden"] * w_bytes + per_layer)
    else:
        activations = tokens * layers_with_graph * per_layer
    activations += tokens * dims["hidden"] * (4 + w_bytes)  # final norm + the hidden states fed to the LM head
    casts = 0
    if act_bytes < w_bytes and layers_with_graph and not method.frozen_linears_in_compute_dtype:
        frozen_linear = sum(l["numel"] for l in linears if l["group"] != "head" and l["name"] + ".weight" not in trainable_names)
        share = layers_with_graph / max(dims["layers"], 1)
        casts = int(frozen_linear * share * act_bytes) if not cfg.gradient_checkpointing else \
            int(frozen_linear / max(dims["layers"], 1) * act_bytes)
    return activations, casts


def format_estimate(est: Estimate) -> str:
    """A human-readable table of the estimate."""
    def mib(b: int) -> str:
        return f"{b / MiB:9,.0f} MiB"

    where = "process RSS (CPU)" if est.device == "cpu" else "GPU memory"
    lines = [
        f"model: {est.model_type}   method: {est.method}   precision: {est.precision}   device: {est.device}"
        + (f"   processes: {est.processes} ({est.sharding})" if est.processes > 1 else ""),
        f"trainable params: {est.trainable_params:,} || all params: {est.total_params:,} || "
        f"trainable%: {est.trainable_percent:.4f}",
    ]
    if est.adapted_modules:
        lines.append(f"adapted modules: {', '.join(est.adapted_modules)}")
    lines += [
        f"tokens per micro-batch: {est.tokens_per_batch:,} ({est.length_source})",
        f"estimated peak {where}:",
        f"  weights              {mib(est.weights_bytes)}",
        f"  grads + AdamW state  {mib(est.trainable_state_bytes)}",
        f"  activations          {mib(est.activation_bytes)}",
        f"  autocast weight copy {mib(est.weight_cast_bytes)}",
        f"  loss / logits        {mib(est.loss_bytes)}",
        f"  framework overhead   {mib(est.overhead_bytes)}",
        f"  allocator slack      {mib(est.slack_bytes)}",
        *([f"  reference copy       {mib(est.reference_bytes)}"] if est.reference_bytes else []),
        f"  total                {mib(est.peak_bytes)}  ({est.peak_bytes / 2**30:.2f} GiB)",
    ]
    lines += [f"note: {n}" for n in est.notes]
    return "\n".join(lines)


def peak_rss_bytes() -> int:
    """This process's own peak RSS in bytes.

    Linux's `getrusage(...).ru_maxrss` is not that: it survives `exec`, so a child started from a large parent
    (subprocess uses vfork) reports the parent's peak (measured: 1.26 GiB for a fresh `import torch` run from the
    test suite, 0.45 GiB from a shell). `VmHWM` belongs to the process's own address space.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def measure_baseline_rss(model_dir: Path) -> int:
    """Peak RSS of a fresh Python that imports the training stack and loads the tokenizer (bytes).

    Measured rather than assumed: it differs by platform, Python and library versions (~0.4 GiB here).
    """
    code = ("import torch, transformers, peft, accelerate\n"
            "from transformers import AutoTokenizer\n"
            f"AutoTokenizer.from_pretrained({str(model_dir)!r})\n"
            "from loraforge.estimate import peak_rss_bytes\n"
            "print(peak_rss_bytes())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=_quiet_env())
    try:
        return int(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 450 * MiB  # measured on the development machine; used only if the probe fails


def _quiet_env() -> dict[str, str]:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


# ------------------------------------------------------------------------------------------------- the model

def _dims(hf_config: Any) -> dict[str, int]:
    """hidden, intermediate, layers, heads, kv_dim, vocab — read under each family's own spelling."""
    def get(*names: str, default: int = 0) -> int:
        for n in names:
            v = getattr(hf_config, n, None)
            if isinstance(v, int) and v > 0:
                return v
        return default

    hidden = get("hidden_size", "d_model", "n_embd", "dim")
    heads = get("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads", "n_heads", default=1)
    kv_heads = get("num_key_value_heads", "multi_query_group_num", default=heads)
    head_dim = get("head_dim", "kv_channels", "d_kv", default=hidden // max(heads, 1))
    layers = get("num_hidden_layers", "n_layer", "num_layers", "n_layers")
    if getattr(hf_config, "is_encoder_decoder", False):
        layers += get("num_decoder_layers", "decoder_layers", default=layers)
    return {
        "hidden": hidden, "layers": layers, "heads": heads, "kv_dim": kv_heads * head_dim, "q_dim": heads * head_dim,
        "intermediate": get("intermediate_size", "ffn_hidden_size", "d_ff", "n_inner", "ffn_dim", "encoder_ffn_dim",
                            "hidden_dim", default=4 * hidden),
        "vocab": get("vocab_size", "padded_vocab_size"),
        "gated": int(str(getattr(hf_config, "hidden_act", "")) in ("silu", "swiglu") or
                     getattr(hf_config, "model_type", "") in ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")),
    }


def _unique_params(model: "nn.Module") -> dict[str, int]:
    """name → element count, each tied/shared tensor once (SmolLM2's lm_head is its embedding)."""
    seen: set[int] = set()
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            out[name] = p.numel()
    return out


def _linears(model: "nn.Module") -> list[dict[str, Any]]:
    from loraforge.models.discovery import linear_modules

    return [{"name": i.name, "leaf": i.leaf, "in": i.in_features, "out": i.out_features, "group": i.group,
             "numel": i.in_features * i.out_features, "layer": layer_index(i.name)} for i in linear_modules(model)]


# ---------------------------------------------------------------------------------------------- the memory

def _dtype_bytes(torch_dtype: str, device: str) -> int:
    if torch_dtype == "auto":
        return 4 if device == "cpu" else 2
    return 4 if torch_dtype == "float32" else 2


def _tokens_per_batch(cfg: RunConfig, model_dir: Path) -> tuple[int, int, str]:
    """(tokens in a large micro-batch, of which labelled, where the length came from).

    With readable data: batch_size × the data's p90 example length (capped at cutoff_len) — packed rows hold
    batch_size examples back to back and padded rows batch_size × the longest, so p90 stands for a typical
    worst batch in both; the labelled share is the data's own. Without data: batch_size × cutoff_len, half of
    it labelled.
    """
    stats = _data_stats(cfg, model_dir)
    if stats is not None and stats.examples:
        length = min(stats.p90, cfg.cutoff_len)
        tokens = cfg.batch_size * length
        share = stats.trained_tokens / max(stats.total_tokens, 1)
        over = f", {stats.over_cutoff} of {stats.examples + stats.dropped} over cutoff_len" if stats.over_cutoff else ""
        return tokens, int(tokens * share), f"batch_size {cfg.batch_size} × data p90 length {length}{over}"
    tokens = cfg.batch_size * cfg.cutoff_len
    return tokens, tokens // 2, f"batch_size {cfg.batch_size} × cutoff_len {cfg.cutoff_len}; data not readable"


def _data_stats(cfg: RunConfig, model_dir: Path) -> Any:
    """The data's `DataStats` (tokenized with the training template), or None when it cannot be read."""
    from loraforge.errors import LoraforgeError

    try:
        from loraforge.data.dataset import build_datasets
        from loraforge.models.loader import load_tokenizer

        tokenizer = load_tokenizer(model_dir, trust_remote_code=cfg.trust_remote_code)
        if cfg.stage != "sft":  # pairs: a pair's two sides are one example (one packed row)
            from loraforge.data.preference import build_preference_data

            return build_preference_data(cfg, tokenizer).stats
        return build_datasets(cfg, tokenizer).stats
    except (LoraforgeError, ImportError, OSError):
        return None


def _layers_with_graph(dims: Mapping[str, int], adapted: list[Mapping[str, Any]], trainable_names: set[str], *,
                       all_layers: bool) -> int:
    """How many layers keep activations: those from the first one with something trainable (or whose input
    needs gradients) to the end; every layer when the method says so (full, virtual tokens)."""
    n = dims["layers"]
    if all_layers:
        return n
    indices = [l["layer"] for l in adapted if l["layer"] is not None]
    indices += [i for i in (layer_index(t) for t in trainable_names) if i is not None]
    if any(layer_index(t) is None for t in trainable_names) and any("embed" in t for t in trainable_names):
        return n
    return n - min(indices) if indices else 0


def _layer_bytes_per_token(cfg: RunConfig, dims: dict[str, int], adapted: list[dict], linears: list[dict],
                           trainable_names: set[str], a: int, lean_blocks: bool = False) -> int:
    """Bytes autograd keeps per token in one transformer layer (forward → backward).

    Per layer (hidden h, intermediate i, activations in `a` bytes, residual stream in the weights' `w` bytes):
      * two RMS/LayerNorms, computed in fp32: input and normalized output, 2 × 2h × 4;
      * attention (sdpa): q, k, v and the output, 4h × a (k/v repeated to all heads for GQA);
      * gated MLP: gate and up outputs plus the activation, 3i × a (2i for a plain MLP);
      * each LoRA-adapted linear: its input in the activation dtype plus the dropout mask, in × (a + 1),
        and the rank-r intermediate, r × a;
      * each trainable base linear: its input, in × a.
    `lean_blocks` (LoRA's fused linears and decoder blocks, `methods.lora_blocks`): each norm keeps only its
    fp32 input, the MLP gate and up; the norms' outputs (read by q/k/v and gate/up) and the gated product (read
    by down) and, in packed rows, the attention output (read by o_proj) are recomputed in backward: no linear's
    input is kept.
    """
    h, i = dims["hidden"], dims["intermediate"]
    n_layers = max(dims["layers"], 1)
    if lean_blocks:
        per = 2 * h * 4 + 4 * h * a + 2 * i * a
    else:
        per = 2 * 2 * h * 4 + 4 * h * a + (3 if dims["gated"] else 2) * i * a
    if cfg.attn_implementation == "eager":
        per += dims["heads"] * min(cfg.cutoff_len, 4096) * 4 * 2  # scores + softmax, fp32, per query token
    dropout_mask = 1 if cfg.lora_dropout > 0 else 0
    inputs: dict[tuple, int] = {}  # each distinct input tensor once when the layers share it
    recomputed = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"} if lean_blocks else set()
    packed = cfg.batching == "packed" or (cfg.batching == "auto" and cfg.task_type is TaskType.CAUSAL_LM)
    if lean_blocks and packed:  # the varlen attention's output
        recomputed.add("o_proj")
    for l in adapted:
        parent, leaf = l["name"].rsplit(".", 1) if "." in l["name"] else ("", l["name"])
        if leaf in recomputed:
            continue
        shared = "qkv" if leaf in ("q_proj", "k_proj", "v_proj") else "gate_up" if leaf in ("gate_proj", "up_proj") \
            else leaf
        inputs[(parent, shared) if lean_blocks else (parent, leaf)] = l["in"] * a
    per += (sum(inputs.values()) + sum(l["in"] * dropout_mask + cfg.lora_rank * a for l in adapted)) // n_layers
    per += sum(l["in"] * a for l in linears if l["name"] + ".weight" in trainable_names
               and l["layer"] is not None) // n_layers
    return int(per)


def _loss_bytes(cfg: RunConfig, dims: Mapping[str, int], tokens: int, labelled: int, a: int, *, fused: bool) -> int:
    """Memory of the LM head + cross-entropy at its peak (the backward of the logits). `fused`: the method
    leaves the fused chunked LM-head loss usable (not with virtual tokens)."""
    v = dims["vocab"]
    if cfg.task_type is not TaskType.CAUSAL_LM:
        return tokens * v * (a + 4) if cfg.task_type is TaskType.SEQ_2_SEQ_LM else 0
    chunked = cfg.chunked_loss and fused
    upcast = 4 if a < 4 else 0  # `.float()` copies bf16/fp16 logits; it is a no-op on fp32 ones
    if chunked:
        # One chunk of labelled positions at a time (recomputed in backward): logits, their fp32 copy,
        # log-softmax and the gradient of the logits, all freed before the next chunk.
        return min(labelled, LOSS_CHUNK_TOKENS) * v * (a + upcast + 4 + 4)
    # Every position's logits, fp32 copy and log-softmax are alive when backward starts, plus their gradients.
    return tokens * v * (a + upcast + 4) + tokens * v * (4 + (a if upcast else 0))
