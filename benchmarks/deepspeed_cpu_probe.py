"""Does DeepSpeed's CPU accelerator train with this torch? `deepspeed.initialize` with ZeRO-2 or ZeRO-3 over gloo,
a small model, 3 steps; each rank prints its losses and the ZeRO optimizer class. Run under torchrun:

    STAGE=2 OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 benchmarks/deepspeed_cpu_probe.py

This is DeepSpeed's own engine, not loraforge: accelerate 1.15 cannot drive DeepSpeed on CPU (see
docs/TRAINING.md), so loraforge refuses that combination; the probe records what the engine itself does.
"""

import os

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator


def main() -> None:
    accel = get_accelerator()
    print(f"accelerator {accel.device_name()}, backend {accel.communication_backend_name()}, "
          f"deepspeed {deepspeed.__version__}, torch {torch.__version__}", flush=True)
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
              "zero_optimization": {"stage": int(os.environ.get("STAGE", "2"))}, "bf16": {"enabled": False}}
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    g = torch.Generator().manual_seed(engine.global_rank)
    for step in range(3):
        x, y = torch.randn(2, 16, generator=g), torch.randn(2, 1, generator=g)
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        print(f"rank {engine.global_rank} step {step} loss {loss.item():.5f}", flush=True)
    print(f"rank {engine.global_rank}: ZeRO stage {config['zero_optimization']['stage']} ran, "
          f"{type(optimizer).__name__}", flush=True)


if __name__ == "__main__":
    main()
