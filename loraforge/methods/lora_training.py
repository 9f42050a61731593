"""LoRA's post-build training steps: faster training of the very same PEFT model, saved and loaded as plain PEFT.

They run after `lora.apply`, for training only (the trainer never saves what they change: frozen base weights and
layer internals), in this order:
1. `fuse_dropout` — PEFT's `lora_A(dropout(x))` as one autograd function keeping a 1-byte mask
   (`lora_dropout.DropoutLinear`), when `fused_lora_dropout` is on;
2. `fuse_linear` — PEFT's `lora.Linear` forward (base matmul, B·A, scale, sum) as one autograd function that
   adds the rank-r product into the base output (`lora_fused.FusedLoraLinear`), when `fused_lora_linear` is on;
3. `fp32_where_it_matters` — when the base was loaded in the compute dtype (`lora.load_kwargs`), norms and every
   trainable parameter back in fp32, so the norm statistics, the adapter and its optimizer state are what they
   are in an fp32-loaded run;
4. `cast_frozen` — under bf16/fp16 autocast, frozen linear weights and embedding tables stored in the autocast
   dtype (the embeddings' output widened to fp32), and LoRA layers taking their input in the dtype it arrives in
   (not DoRA: its magnitude math reads the base weight in fp32).

5. `fuse_blocks` — the frozen RMSNorms and SiLU-gated MLP products of Llama-style blocks as autograd functions
   that keep less for backward (`lora_blocks`), when `fused_decoder_blocks` is on.

Only the `lora` record lists them; QLoRA's 4-bit base layers are not `nn.Linear` and keep PEFT's own path.
A new training-only kernel for LoRA is one more step here, listed in `LORA_TRAINING_STEPS`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from loraforge.config import RunConfig
    from loraforge.methods.base import TrainingContext


def fuse_dropout(model: torch.nn.Module, cfg: RunConfig, ctx: TrainingContext) -> None:
    """Swap PEFT's dropout-then-`lora_A` for `DropoutLinear` (same math, a 1-byte mask instead of the dropped-out
    input kept for backward)."""
    if not cfg.fused_lora_dropout:
        return
    from loraforge.methods.lora_dropout import fuse_lora_dropout

    fuse_lora_dropout(model)


def fuse_linear(model: torch.nn.Module, cfg: RunConfig, ctx: TrainingContext) -> None:
    """Compute each plain LoRA linear as one autograd function (same math as PEFT, fewer passes over memory);
    DoRA, Conv1D, quantized and multi-adapter layers keep PEFT's forward."""
    if not cfg.fused_lora_linear:
        return
    from loraforge.methods.lora_fused import fuse_lora_linears

    fuse_lora_linears(model)


def fuse_blocks(model: torch.nn.Module, cfg: RunConfig, ctx: TrainingContext) -> None:
    """Frozen RMSNorms and SiLU-gated MLP products of Llama-style blocks as leaner autograd functions
    (`lora_blocks`), when `fused_decoder_blocks` is on (not DoRA: its magnitude math reads fp32 inputs)."""
    if not cfg.fused_decoder_blocks or cfg.use_dora:
        return
    from loraforge.methods.lora_blocks import fuse_decoder_blocks

    fuse_decoder_blocks(model, getattr(getattr(model, "config", None), "model_type", ""))


def fp32_where_it_matters(model: torch.nn.Module, cfg: RunConfig, ctx: TrainingContext) -> None:
    """Norms and trainable parameters in fp32 when the base was loaded in a 16-bit dtype.

    These are small (SmolLM2-135M: 0.02 M norm weights) next to the frozen linears and embeddings, which stay
    16-bit (`cast_frozen` then makes the embeddings' output fp32, so the residual stream is fp32 as in an
    fp32-loaded run).
    """
    import torch

    if ctx.compute_dtype is None:
        return
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for name, param in module.named_parameters(recurse=False):
            wanted = is_norm or param.requires_grad  # frozen embeddings stay 16-bit: see `cast_frozen_embeddings`
            if wanted and param.is_floating_point() and param.dtype != torch.float32:
                param.data = param.data.float()


def cast_frozen(model: torch.nn.Module, cfg: RunConfig, ctx: TrainingContext) -> None:
    """Frozen weights in the autocast dtype and no fp32 round trip of LoRA inputs (bf16/fp16 runs, not DoRA)."""
    if cfg.use_dora or ctx.compute_dtype is None:
        return
    if cast_frozen_linears(model, ctx.compute_dtype) + cast_frozen_embeddings(model, ctx.compute_dtype):
        release_checkpoint_pages(model)
    keep_lora_input_dtype(model)


def release_checkpoint_pages(model: torch.nn.Module) -> int:
    """Copy the frozen fp32 tensors left after the cast (embeddings, norms, buffers) out of the checkpoint file.

    An fp32 checkpoint loads memory-mapped without a copy; casting its frozen linears read every page of the file,
    and those pages stay resident, counted in the process's memory, for as long as any tensor (the embedding, a
    norm) still points into the mapping. Copying those few tensors lets the mapping go (measured on SmolLM2 DPO:
    resident memory after the build 1,077 → 773 MB). Returns how many tensors were copied.
    """
    import torch

    copied = 0
    for module in model.modules():
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for _name, tensor in tensors:
            if tensor is not None and tensor.dtype == torch.float32 and not tensor.requires_grad:
                tensor.data = tensor.data.clone()
                copied += 1
    return copied


def cast_frozen_linears(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store frozen linear weights (and biases) in the autocast dtype; returns how many layers were cast.

    Autocast casts a frozen fp32 weight at every use (its cast cache holds only leaves that require grad), so
    this gives the very same matmuls without the per-step casts (measured: 3.5% faster SmolLM2 LoRA steps on
    CPU). Only for adapter training: the base weights are never saved. Weights shared with an embedding (a tied
    LM head) are left to `cast_frozen_embeddings`.
    """
    import torch

    embedding_params = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    cast = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear or module.weight.requires_grad or id(module.weight) in embedding_params \
                or (module.bias is not None and module.bias.requires_grad):
            continue
        module.weight.data = module.weight.data.to(dtype)
        if module.bias is not None:
            module.bias.data = module.bias.data.to(dtype)
        cast += 1
    return cast


def cast_frozen_embeddings(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store frozen embedding tables in the autocast dtype, their output cast to fp32; returns how many.

    A tied LM head is the embedding's weight: in fp32 it was cast to 16-bit at every forward (SmolLM2: 28 M
    values, ~85 ms of a 0.45 s persona step, several times a DPO step), and the fp32 table is twice the memory
    (1 GB more for a 7B model's 150 k-token vocabulary). The lookup returns the table's values widened to fp32,
    so the residual stream stays fp32; they are the values rounded to 16 bits, as the autocast head already
    multiplies by. Only for adapter training (the base weights are never saved); trainable tables are left.
    """
    import torch

    cast = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Embedding) or module.weight.requires_grad:
            continue
        if module.weight.dtype != dtype:
            module.weight.data = module.weight.data.to(dtype)
        module.register_forward_hook(_output_in_fp32)
        cast += 1
    return cast


def _output_in_fp32(module: torch.nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return output.float()


def keep_lora_input_dtype(model: torch.nn.Module) -> int:
    """Let LoRA layers take their input in the dtype it arrives in (for training under autocast only).

    PEFT casts a LoRA layer's input to the adapter weights' dtype (fp32) before `lora_A`; under autocast the
    matmul casts it straight back, so a bf16 input (o_proj's, down_proj's) makes two full-size copies forward,
    two more backward, and autograd keeps the fp32 copy. bf16 → fp32 → bf16 is exact: same numbers, fewer
    passes over memory. Only layers whose dropout is identity (p = 0, or fused into DropoutLinear): PEFT's own
    dropout would draw a different mask for a bf16 tensor. Returns how many layers were changed.
    """
    import torch
    from peft.tuners.lora import LoraLayer

    changed = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and all(isinstance(d, torch.nn.Identity) for d in module.lora_dropout.values()):
            module.cast_input_dtype_enabled = False
            changed += 1
    return changed


# The order matters: `fuse_linear` and `keep_lora_input_dtype` only touch layers whose dropout is already identity
# (p = 0, or fused into DropoutLinear).
LORA_TRAINING_STEPS = (fuse_dropout, fuse_linear, fp32_where_it_matters, cast_frozen, fuse_blocks)
