"""Training-only kernels for the frozen parts of a Llama-style decoder block: RMSNorm and the SwiGLU product.

Under LoRA the norms and the MLP's `silu(gate) · up` are frozen code that autograd still records op by op, and
what it keeps for backward is most of a short row's memory:
* HF's `RMSNorm` keeps its fp32 input *and* the fp32 normalized copy, and returns fp32, which q/k/v (or gate/up)
  each cast to bf16 again under autocast, while the fused LoRA layers keep the fp32 output as their input.
  `_RMSNorm` keeps the input and the `[tokens]` reciprocal RMS only, and returns the compute dtype directly: the
  very values the projections' autocast casts produced (same forward), one cast instead of three.
* `silu(gate) · up` keeps gate, silu(gate) and up; `_SwiGLU` keeps gate and up and recomputes the sigmoid.
Measured on SmolLM2-135M DPO (4 pairs per step, bf16): see BENCHMARKS.md. The difference in backward: the three
projections' input gradients are summed in the compute dtype (they arrive rounded to it from their matmuls)
instead of in fp32 — bf16 noise, as in a model loaded in bf16 (`tests/test_lora_blocks.py`).

* The norms' outputs, the SwiGLU product and the attention output (`train.attention` joins its segments into
  o_proj's input, a copy of what the attention kernel keeps) are not kept at all: the projections reading them
  would each keep them as their input (`[tokens × hidden]` twice and `[tokens × intermediate]` once per block, ~45% of what a
  SmolLM2 block keeps), so while a block runs forward, a save of one of them is stored as *how to compute it
  again* from what the norm / the product keeps anyway (`_Recompute`, through autograd's saved-tensor hooks).
  Backward recomputes it, the very same values, once for all its readers: one elementwise pass instead of a
  tensor kept from forward to backward.

Only where every reader of the norm's output is a linear layer: the `input_layernorm` (read by the attention's
q/k/v projections) and `post_attention_layernorm` (read by the MLP's gate/up) of the model types in
`FUSED_BLOCK_TYPES`, whose MLP is `down(silu(gate(x)) · up(x))`. The final norm and other families keep their code;
under gradient checkpointing (which recomputes whole blocks) the saves are left to it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# decoder blocks laid out as Llama's: pre-norms read only by linear projections, a SiLU-gated MLP
FUSED_BLOCK_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3"})


class _RMSNorm(torch.autograd.Function):
    """y = (weight · x · rsqrt(mean(x²) + eps)).to(out_dtype), computed in fp32 as HF's RMSNorm; saves x, rstd.

    Returns (y, rstd): the `[tokens × 1]` reciprocal RMS (not differentiable) lets y be recomputed from x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype):
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        y = weight * (x32 * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        ctx.mark_non_differentiable(rstd)
        return y.to(out_dtype), rstd

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, _grad_rstd: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        x_hat = x.float() * rstd
        g = grad_out.float()
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (g * x_hat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            gw = g * weight.float()
            grad_x = (gw - x_hat * (gw * x_hat).mean(-1, keepdim=True)).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, None, None


class _SwiGLU(torch.autograd.Function):
    """silu(gate) · up, saving gate and up only (the sigmoid is recomputed in backward)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gate, up = ctx.saved_tensors
        g32 = gate.float()
        sig = torch.sigmoid(g32)
        grad = grad_out.float()
        grad_up = (grad * g32 * sig).to(up.dtype) if ctx.needs_input_grad[1] else None
        grad_gate = None
        if ctx.needs_input_grad[0]:
            grad_gate = (grad * up.float() * sig * (1 + g32 * (1 - sig))).to(gate.dtype)
        return grad_gate, grad_up


class _Recompute:
    """A saved tensor stored as the function and inputs that compute it again; its readers share one recompute.

    `pending` counts the saves not yet read back: the value recomputed for the first reader in backward is kept
    for the others and dropped after the last one (a graph run backward twice recomputes it again)."""

    __slots__ = ("fn", "args", "pending", "value")

    def __init__(self, fn, *args) -> None:
        self.fn, self.args, self.pending, self.value = fn, args, 0, None

    def unpack(self) -> torch.Tensor:
        value = self.value if self.value is not None else self.fn(*self.args)
        self.pending -= 1
        self.value = value if self.pending > 0 else None
        return value


class _Saved(NamedTuple):
    """What a save of a registered tensor stores: its recompute and the shape it was saved in (a reshaped view)."""

    recompute: _Recompute
    shape: torch.Size


class _BlockSaves:
    """Saved-tensor hooks for one decoder block's forward: a save of a tensor registered with `recompute` (or of
    a reshaped view of all of it) is stored as its `_Recompute`; everything else is saved as usual."""

    def __init__(self) -> None:
        self.registered: dict[tuple, tuple[_Recompute, torch.Tensor]] = {}
        self.active = False  # inside the block's forward, hooks installed

    @staticmethod
    def _key(t: torch.Tensor) -> tuple:
        return t.data_ptr(), t.dtype, t.device

    def recompute(self, value: torch.Tensor, fn, *args) -> torch.Tensor:
        """Register `value` (= fn(*args), contiguous) and return it. The registry holds it until the block's
        forward ends, so its memory cannot be reused by another tensor meanwhile. Outside the block's hooks
        (called on its own, under gradient checkpointing) nothing is registered."""
        if self.active and value.is_contiguous():
            self.registered[self._key(value)] = (_Recompute(fn, *args), value)
        return value

    def pack(self, t: torch.Tensor):
        entry = self.registered.get(self._key(t)) if t.layout == torch.strided else None
        # the same memory read whole, in order: the value itself or a reshaped view of it (o_proj's input)
        if entry is None or not t.is_contiguous() or t.numel() != entry[1].numel():
            return t
        entry[0].pending += 1
        return _Saved(entry[0], t.shape)

    @staticmethod
    def unpack(saved):
        return saved.recompute.unpack().view(saved.shape) if isinstance(saved, _Saved) else saved


def _recomputing(self: nn.Module) -> bool:
    return self.training and torch.is_grad_enabled() and not getattr(self, "gradient_checkpointing", False)


def _layer_forward(self: nn.Module, *args, **kwargs):
    if not _recomputing(self):
        return type(self).forward(self, *args, **kwargs)
    saves = self._loraforge_saves
    saves.active = True
    try:
        with torch.autograd.graph.saved_tensors_hooks(saves.pack, saves.unpack):
            return type(self).forward(self, *args, **kwargs)
    finally:
        saves.active = False
        saves.registered.clear()


def _norm_value(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    return (weight * (x.float() * rstd).to(x.dtype)).to(out_dtype)  # _RMSNorm's forward, from its saved rstd


def _norm_forward(self: nn.Module, hidden_states: torch.Tensor, saves: _BlockSaves) -> torch.Tensor:
    if not (self.training and torch.is_grad_enabled()):
        return type(self).forward(self, hidden_states)
    device = hidden_states.device.type
    out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden_states.dtype
    y, rstd = _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon, out_dtype)
    return saves.recompute(y, _norm_value, hidden_states, self.weight, rstd, out_dtype)  # what _RMSNorm keeps


def _mlp_forward(self: nn.Module, x: torch.Tensor, saves: _BlockSaves) -> torch.Tensor:
    if not (self.training and torch.is_grad_enabled()):
        return type(self).forward(self, x)
    gate, up = self.gate_proj(x), self.up_proj(x)
    act = saves.recompute(_SwiGLU.apply(gate, up), _swiglu_value, gate, up)  # the inputs _SwiGLU keeps anyway
    return self.down_proj(act)


def _swiglu_value(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def fuse_decoder_blocks(model: nn.Module, model_type: str) -> int:
    """Give each decoder block's two pre-norms and its MLP the kernels above (instance forwards, so modules,
    parameters and state-dict keys are unchanged); returns how many blocks. A no-op for other model types, for
    norms that are not HF's plain RMSNorm, or MLPs that are not SiLU-gated."""
    if model_type not in FUSED_BLOCK_TYPES:
        return 0
    fused = 0
    for module in model.modules():
        norms = [getattr(module, n, None) for n in ("input_layernorm", "post_attention_layernorm")]
        mlp = getattr(module, "mlp", None)
        if not all(_plain_rmsnorm(n) for n in norms) or not _silu_gated(mlp):
            continue
        saves = _BlockSaves()
        for norm in norms:
            norm.forward = functools.partial(_norm_forward, norm, saves=saves)
        mlp.forward = functools.partial(_mlp_forward, mlp, saves=saves)
        module._loraforge_saves = saves
        if isinstance(getattr(module, "self_attn", None), nn.Module):  # the varlen attention registers its output
            module.self_attn._loraforge_saves = saves
        module.forward = functools.partial(_layer_forward, module)
        fused += 1
    return fused


def _plain_rmsnorm(norm: nn.Module | None) -> bool:
    return (norm is not None and type(norm).__name__.endswith("RMSNorm") and hasattr(norm, "variance_epsilon")
            and isinstance(getattr(norm, "weight", None), nn.Parameter) and not norm.weight.requires_grad)


def _silu_gated(mlp: nn.Module | None) -> bool:
    act = getattr(mlp, "act_fn", None)
    return (mlp is not None and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"))
