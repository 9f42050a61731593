"""Model FLOPs utilisation on this machine: the model's FLOPs per token, and the matmul rate it could reach.

FLOPs per token of LoRA training (the usual accounting, counted on every real, non-padding token):

    4·N_frozen          frozen linear weights of the blocks: forward 2·N and the input gradient 2·N (no weight grad)
  + 4·N_head · f        the LM head (frozen, tied to the embedding), only where a loss is taken (f = trained share)
  + 6·N_lora            LoRA's A and B: forward, input gradient and weight gradient, 2·N each
  + 12·L·d·c            attention scores and mixing (QKᵀ, PV: 4·d·c forward, twice that backward), c = mean number
                        of keys a query attends to under causal attention within its own example = Σ Lᵢ(Lᵢ+1)/2 / Σ Lᵢ

MFU = tokens/s × FLOPs per token / peak, where the peak is this machine's bf16 (or the run's dtype) `torch.matmul`
rate at the model's own projection shapes (`[tokens × in] @ [in × out]` for q/o, k/v, gate/up, down and the LM
head), measured after warm-up with the threads training uses, and combined weighted by how many FLOPs each shape
does in a forward pass: the rate a step made only of these matmuls would run at.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Shapes:
    """A llama-family decoder's sizes (SmolLM2: hidden 576, MLP 1536, 30 layers, 9 heads / 3 key-value heads)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @classmethod
    def of(cls, model_dir: Path) -> "Shapes":
        c = json.loads((Path(model_dir) / "config.json").read_text())
        return cls(c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["num_attention_heads"],
                   c.get("num_key_value_heads", c["num_attention_heads"]), c["vocab_size"])

    @property
    def kv_width(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def projections(self) -> list[tuple[str, int, int, int]]:
        """(name, in, out, how many per model) of every distinct linear shape, the LM head last."""
        h, m, kv, n = self.hidden, self.intermediate, self.kv_width, self.layers
        return [("q/o_proj", h, h, 2 * n), ("k/v_proj", h, kv, 2 * n), ("gate/up_proj", h, m, 2 * n),
                ("down_proj", m, h, n), ("lm_head", h, self.vocab, 1)]

    def block_linear_params(self) -> int:
        return sum(i * o * k for name, i, o, k in self.projections() if name != "lm_head")

    def lora_params(self, rank: int) -> int:
        return sum(rank * (i + o) * k for name, i, o, k in self.projections() if name != "lm_head")


def flops_per_token(shapes: Shapes, *, lora_rank: int, trained_share: float, context: float) -> float:
    """Training FLOPs per real token (the formula in this module's docstring)."""
    head = shapes.hidden * shapes.vocab
    return (4 * shapes.block_linear_params() + 4 * head * trained_share + 6 * shapes.lora_params(lora_rank)
            + 12 * shapes.layers * shapes.hidden * context)


def causal_context(lengths: list[int]) -> float:
    """Mean number of keys per query under causal attention within each example."""
    return sum(n * (n + 1) / 2 for n in lengths) / max(sum(lengths), 1)


def matmul_peak(shapes: Shapes, tokens: int, *, threads: int, dtype_name: str = "bfloat16",
                seconds: float = 0.2, trials: int = 5) -> tuple[float, dict[str, float]]:
    """(FLOP-weighted peak TFLOP/s, {shape name: TFLOP/s}) of `torch.matmul` at the model's shapes on this CPU.

    Each shape's rate is the best of `trials` timed windows of `seconds` (after a warm-up window): the machine's
    capability, not its average under whatever else shares it."""
    import torch

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    rates: dict[str, float] = {}
    total_flops = total_time = 0.0
    for name, k, n, count in shapes.projections():
        a, b = torch.randn(tokens, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        best = math.inf
        for trial in range(trials + 1):  # the first window is warm-up (oneDNN builds its kernel for the shape)
            reps, t = 0, time.perf_counter()
            while time.perf_counter() - t < seconds:
                torch.matmul(a, b)
                reps += 1
            if trial:
                best = min(best, (time.perf_counter() - t) / reps)
        flops = 2 * tokens * k * n
        rates[name] = flops / best / 1e12
        total_flops += flops * count
        total_time += best * count
    return total_flops / total_time / 1e12, rates
