"""Learning-rate schedules and weight-decay groups."""

import math

import pytest
import torch
from torch import nn

from loraforge.config import config_from_dict
from loraforge.train.optim import build_optimizer, lr_factor


def test_warmup_then_decay_shapes():
    f = [lr_factor(s, total=10, warmup=2, kind="linear") for s in range(10)]
    assert f[0] < f[1] < 1.0 and f[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[2:], f[3:])) and f[-1] < 0.2
    c = [lr_factor(s, total=10, warmup=0, kind="cosine") for s in range(10)]
    assert c[0] == pytest.approx(1.0) and c[5] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert [lr_factor(s, total=10, warmup=3, kind="constant") for s in range(3, 10)] == [1.0] * 7


def test_no_weight_decay_on_norms_and_biases():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    cfg = config_from_dict({"metadata_path": "x.jsonl", "weight_decay": 0.1})
    opt = build_optimizer(model, cfg)
    by_decay = {g["weight_decay"]: sum(p.numel() for p in g["params"]) for g in opt.param_groups}
    assert by_decay == {0.1: 16, 0.0: 4 + 4 + 4}
