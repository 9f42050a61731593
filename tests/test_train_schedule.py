"""Optimization knobs seen from the outside: the learning rate each step used (metrics.jsonl), warmup by steps or
ratio, no weight decay on norms/biases of a real model, gradient clipping, seeds, max_steps vs (fractional) epochs."""

import json
import math

import pytest

from test_train_helpers import (adapter, make_cfg, records, rows_file, run, tiny_llama,  # noqa: F401
                                train_losses)

LR = 1e-2


def _lrs(run_dir):
    return [r["lr"] for r in records(run_dir) if "loss" in r]


@pytest.mark.parametrize("kind, warm, expected", [
    # warmup ramps (s+1)/(w+1) of the peak; the decay then spans the remaining steps (as in transformers)
    ("constant", dict(warmup_steps=2), [1 / 3, 2 / 3, 1, 1, 1, 1]),
    ("linear", dict(warmup_ratio=0.3), [1 / 3, 2 / 3, 1, 3 / 4, 2 / 4, 1 / 4]),  # ceil(0.3 × 6) = 2 warmup steps
    ("cosine", dict(warmup_steps=2), [1 / 3, 2 / 3] + [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]),
])
def test_schedule_and_warmup_are_what_each_step_used(tiny_llama, rows_file, tmp_path, kind, warm, expected):
    run(tiny_llama, rows_file, tmp_path / kind, max_steps=6, batch_size=1, lr_scheduler=kind, **warm)
    assert _lrs(tmp_path / kind) == pytest.approx([LR * f for f in expected], rel=1e-9, abs=1e-12)


def test_no_weight_decay_on_norms_and_biases_of_a_real_model(tiny_llama):
    from loraforge.config import config_from_dict
    from loraforge.methods import apply_method
    from loraforge.models.loader import load_model
    from loraforge.train.optim import build_optimizer

    cfg = config_from_dict({"base_model": str(tiny_llama), "metadata_path": "x.jsonl", "method": "lora",
                            "lora_bias": "all", "weight_decay": 0.1, "target_modules": "all-linear",
                            "modules_to_save": ["norm"]})
    model = apply_method(load_model(tiny_llama, cfg.task_type), cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: [names[id(p)] for p in g["params"]] for g in build_optimizer(model, cfg).param_groups}
    assert groups[0.1] and all("lora_A" in n or "lora_B" in n for n in groups[0.1])
    assert any("norm" in n for n in groups[0.0]) and all("norm" in n or n.endswith(".bias") for n in groups[0.0])


def test_gradient_clipping_is_reported_and_applied(tiny_llama, rows_file, tmp_path):
    """adam_epsilon 1 makes the first AdamW update proportional to the gradient (|g| ≪ eps), so clipping the norm
    to c shrinks the weight change by c / ‖g‖: visible, unlike with the usual eps where Adam is scale-free."""
    common = dict(max_steps=1, adam_epsilon=1.0, learning_rate=1.0, weight_decay=0.0)
    free = run(tiny_llama, rows_file, tmp_path / "free", max_grad_norm=None, **common)
    clipped = run(tiny_llama, rows_file, tmp_path / "clip", max_grad_norm=1e-3, **common)
    assert free.global_step == clipped.global_step == 1
    (g_free,) = [r["grad_norm"] for r in records(tmp_path / "free")]
    (g_clip,) = [r["grad_norm"] for r in records(tmp_path / "clip")]
    assert g_free == pytest.approx(g_clip) and g_free > 1e-2  # the norm before clipping, logged either way
    a_free, a_clip = adapter(tmp_path / "free"), adapter(tmp_path / "clip")
    change = {k: float(a_free[k].norm()) for k in a_free if "lora_B" in k}  # B starts at 0: its value is the update
    change_clip = {k: float(a_clip[k].norm()) for k in a_clip if "lora_B" in k}
    ratio = math.sqrt(sum(v * v for v in change_clip.values())) / math.sqrt(sum(v * v for v in change.values()))
    assert ratio == pytest.approx(1e-3 / g_free, rel=0.05)


def test_same_seed_same_run_other_seed_other_run(tiny_llama, rows_file, tmp_path):
    for name, seed in [("a", 3), ("b", 3), ("c", 4)]:
        run(tiny_llama, rows_file, tmp_path / name, seed=seed, max_steps=3)
    la, lb, lc = (train_losses(tmp_path / n) for n in "abc")
    assert la == lb  # bit-identical
    wa, wb, wc = (adapter(tmp_path / n) for n in "abc")
    assert all((wa[k] == wb[k]).all() for k in wa)
    assert la != lc and any(not (wa[k] == wc[k]).all() for k in wa)


@pytest.mark.parametrize("steps, expected", [
    (dict(epochs=0.5), 4),                 # 16 examples / batch 2 = 8 steps per epoch
    (dict(epochs=1.5), 12),
    (dict(epochs=1, max_steps=3), 3),      # max_steps wins over epochs
    (dict(epochs=1, max_steps=11), 11),    # and may run past one epoch
])
def test_max_steps_and_fractional_epochs(tiny_llama, rows_file, tmp_path, steps, expected):
    kw = dict(steps)
    kw.setdefault("max_steps", None)
    result = run(tiny_llama, rows_file, tmp_path / "r", batch_size=2, learning_rate=1e-4, **kw)
    assert result.global_step == expected
    recs = [r for r in records(tmp_path / "r") if "loss" in r]
    assert [r["step"] for r in recs] == list(range(1, expected + 1))
    assert recs[-1]["epoch"] == pytest.approx(expected / 8, abs=1e-3)
    assert json.loads((tmp_path / "r" / "run.json").read_text())["global_step"] == expected
