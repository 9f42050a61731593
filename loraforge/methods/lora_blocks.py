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

Only where every reader of the norm's output is an autocast linear layer: the `input_layernorm` (read by the
attention's q/k/v projections) and `post_attention_layernorm` (read by the MLP's gate/up) of the model types in
`FUSED_BLOCK_TYPES`, whose MLP is `down(silu(gate(x)) · up(x))`. The final norm and other families keep their code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# decoder blocks laid out as Llama's: pre-norms read only by linear projections, a SiLU-gated MLP
FUSED_BLOCK_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3"})


class _RMSNorm(torch.autograd.Function):
    """y = (weight · x · rsqrt(mean(x²) + eps)).to(out_dtype), computed in fp32 as HF's RMSNorm; saves x, rstd."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        y = weight * (x32 * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
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


def _norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    device = hidden_states.device.type
    if not (self.training and torch.is_grad_enabled() and torch.is_autocast_enabled(device)):
        return type(self).forward(self, hidden_states)
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon, torch.get_autocast_dtype(device))


def _mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not (self.training and torch.is_grad_enabled()):
        return type(self).forward(self, x)
    return self.down_proj(_SwiGLU.apply(self.gate_proj(x), self.up_proj(x)))


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
        for norm in norms:
            norm.forward = _norm_forward.__get__(norm)
        mlp.forward = _mlp_forward.__get__(mlp)
        fused += 1
    return fused


def _plain_rmsnorm(norm: nn.Module | None) -> bool:
    return (norm is not None and type(norm).__name__.endswith("RMSNorm") and hasattr(norm, "variance_epsilon")
            and isinstance(getattr(norm, "weight", None), nn.Parameter) and not norm.weight.requires_grad)


def _silu_gated(mlp: nn.Module | None) -> bool:
    act = getattr(mlp, "act_fn", None)
    return (mlp is not None and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"))
