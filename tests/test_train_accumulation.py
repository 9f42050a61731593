"""Gradient accumulation is normalized by trained tokens across the whole optimizer step: accumulation N × batch B
equals batch N·B (losses per step and final adapter), padded and packed alike; gradient checkpointing changes
nothing but memory, and
dataloader workers nothing but where batches are collated."""

import pytest

from test_train_helpers import (adapter, assert_losses_close, max_weight_diff, rows_file, run,  # noqa: F401
                                tiny_llama, train_losses)

STEPS = 3


@pytest.fixture(scope="module")
def runs(tiny_llama, rows_file, tmp_path_factory):
    """Same global batch of 4 examples per step, split four ways."""
    root = tmp_path_factory.mktemp("accum")
    shapes = {"padded_4x1": dict(batching="padded", batch_size=4, gradient_accumulation_steps=1),
              "padded_1x4": dict(batching="padded", batch_size=1, gradient_accumulation_steps=4),
              "packed_2x2": dict(batching="packed", batch_size=2, gradient_accumulation_steps=2),
              "packed_1x4_ckpt": dict(batching="packed", batch_size=1, gradient_accumulation_steps=4,
                                      gradient_checkpointing=True),
              "padded_4x1_workers": dict(batching="padded", batch_size=4, gradient_accumulation_steps=1,
                                         dataloader_num_workers=2)}
    out = {}
    for name, kw in shapes.items():
        result = run(tiny_llama, rows_file, root / name, max_steps=STEPS, target_modules="all-linear", **kw)
        assert result.global_step == STEPS
        out[name] = root / name
    return out


def test_examples_differ_enough_that_a_per_micro_batch_mean_would_be_wrong(tiny_llama, rows_file):
    from loraforge.config import config_from_dict
    from loraforge.data.dataset import build_datasets
    from loraforge.models.loader import load_tokenizer
    from loraforge.train.loss import trained_token_count

    cfg = config_from_dict({"base_model": str(tiny_llama), "metadata_path": str(rows_file), "tokenized_cache": False,
                            "cutoff_len": 128})
    counts = [trained_token_count(e.labels) for e in build_datasets(cfg, load_tokenizer(tiny_llama)).train]
    assert max(counts) >= 8 * min(counts), counts


@pytest.mark.parametrize("name", ["padded_1x4", "packed_2x2"])
def test_accumulation_matches_the_big_batch(runs, name):
    assert_losses_close(train_losses(runs[name]), train_losses(runs["padded_4x1"]), tol=1e-5)
    ref = adapter(runs["padded_4x1"])
    assert max_weight_diff(adapter(runs[name]), ref) < 1e-5
    # the adapter did move: equality above is not two untrained adapters agreeing
    assert max(float(v.abs().max()) for k, v in ref.items() if "lora_B" in k) > 1e-3


def test_gradient_checkpointing_gives_the_same_training(runs):
    assert_losses_close(train_losses(runs["packed_1x4_ckpt"]), train_losses(runs["padded_4x1"]), tol=1e-5)
    assert max_weight_diff(adapter(runs["packed_1x4_ckpt"]), adapter(runs["padded_4x1"])) < 1e-5


def test_dataloader_workers_feed_the_same_batches(runs):
    assert train_losses(runs["padded_4x1_workers"]) == train_losses(runs["padded_4x1"])
    assert max_weight_diff(adapter(runs["padded_4x1_workers"]), adapter(runs["padded_4x1"])) == 0


def test_dataloader_workers_collate_in_other_processes(tiny_llama, rows_file):
    """The knob is applied: with workers the micro-batches are collated outside the training process, in order."""
    import os

    import torch

    from loraforge.config import config_from_dict
    from loraforge.train.setup import Setup

    class PidSetup(Setup):
        def collate(self, micro_batch, val=False):
            return {"pid": torch.tensor(os.getpid()), "first": torch.tensor(micro_batch[0][0])}

    groups = [[[[0]], [[1]]], [[[2]], [[3]]], [[[4]], [[5]]]]
    for workers in (0, 2):
        cfg = config_from_dict({"base_model": str(tiny_llama), "metadata_path": str(rows_file),
                                "dataloader_num_workers": workers})
        setup = PidSetup(cfg, tiny_llama, tokenizer=None, data=None, batching="padded")
        fed = list(setup.feed(groups, start=1, rank=1, world_size=2))
        assert [g for g, _ in fed] == groups[1:]
        assert [[int(b["first"]) for b in mine] for _, mine in fed] == [[3], [5]]  # rank 1 of 2, from step 1
        pids = {int(b["pid"]) for _, mine in fed for b in mine}
        assert (pids == {os.getpid()}) if workers == 0 else (os.getpid() not in pids)
