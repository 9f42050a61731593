"""What a run leaves behind: the run-dir contract (exact file set), metrics.jsonl, TensorBoard events read back by
tensorboard's own reader (also after a resume), loss.png, run.json, and adapters that plain PEFT loads — output_dir
and every checkpoint — reproducing the validation loss the training model measured at that step."""

import json
import shutil

import pytest
import torch

from test_train_helpers import (REPO, adapter, make_cfg, records, run, tiny_llama, train_losses,  # noqa: F401
                                val_losses, write_rows)

STEPS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("obs-data")
    return write_rows(root / "train.jsonl", 16), write_rows(root / "val.jsonl", 4, offset=50)


@pytest.fixture(scope="module")
def full_run(tiny_llama, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("obs") / "run"
    opts = dict(val_file=str(data[1]), eval_steps=3, save_steps=3, max_steps=STEPS, report_to=["tensorboard"],
                plot_loss=True, target_modules="all-linear", tune_cpu_malloc=True)
    run(tiny_llama, data[0], out, **opts)
    return out, opts


def test_run_dir_holds_exactly_the_contracted_files(full_run):
    out, _ = full_run
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "adapter_config.json", "adapter_model.safetensors", "README.md",  # the PEFT adapter (README: PEFT's card)
        "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",  # the tokenizer with its chat template
        "config.yaml", "run.json", "metrics.jsonl", "tensorboard", "loss.png",
        "checkpoint-3", "checkpoint-6"])
    assert all(p.name.startswith("events.out.tfevents") for p in (out / "tensorboard").iterdir())


def test_metrics_jsonl_records(full_run):
    out, _ = full_run
    train = [r for r in records(out) if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for r in train:
        assert set(r) == {"time", "step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"}
        assert r["loss"] > 0 and r["grad_norm"] > 0 and r["tokens_per_s"] > 0
    assert all(a["tokens"] < b["tokens"] for a, b in zip(train, train[1:]))
    assert sorted(val_losses(out)) == [3, 6]


def test_tensorboard_events_read_back_with_tensorboards_reader(full_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = full_run
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert {"loss", "lr", "grad_norm", "val/loss", "val/ppl"} <= set(acc.Tags()["scalars"])
    tb_loss = {e.step: e.value for e in acc.Scalars("loss")}
    assert tb_loss == pytest.approx(train_losses(out), rel=1e-6)
    assert {e.step: e.value for e in acc.Scalars("val/loss")} == pytest.approx(val_losses(out), rel=1e-6)


def test_a_resumed_run_has_each_step_once_in_tensorboard_and_metrics(full_run, tiny_llama, data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    src, opts = full_run
    out = tmp_path / "resumed"
    shutil.copytree(src, out)
    run(tiny_llama, data[0], out, overwrite_output_dir=False, resume_from_checkpoint=str(out / "checkpoint-3"), **opts)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, STEPS + 1))
    assert [e.step for e in acc.Scalars("val/loss")] == [3, 6]
    assert [r["step"] for r in records(out)] == [1, 2, 3, 3, 4, 5, 6, 6]  # train and val records


def test_loss_png_is_a_valid_image(full_run):
    import matplotlib.image

    out, _ = full_run
    png = out / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(png)
    assert pixels.shape[0] >= 200 and pixels.shape[1] >= 300
    assert pixels.std() > 0.01  # something was drawn


def test_run_json(full_run):
    import peft
    import transformers

    out, _ = full_run
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["global_step"] == STEPS
    assert info["versions"]["torch"] == torch.__version__ and info["versions"]["peft"] == peft.__version__
    assert info["versions"]["transformers"] == transformers.__version__
    assert 0 < info["first_step_s"] <= info["seconds"]
    assert info["tokens_seen"] == [r for r in records(out) if "loss" in r][-1]["tokens"]
    assert info["trainable_params"] == sum(w.numel() for w in adapter(out).values())
    assert info["total_params"] > info["trainable_params"] and info["precision"] == "fp32"
    assert info["data"]["examples"] == 16 and info["data"]["val_examples"] == 4
    assert info["best_step"] in (3, 6) and info["final_loss"] == pytest.approx(train_losses(out)[STEPS])
    assert info["cpu_malloc_tuned"] is True  # asked for, and Linux/glibc here: applied


def _plain_peft_val_loss(base_dir, adapter_dir, examples) -> float:
    """Mean next-token loss over trained tokens, computed with nothing but transformers + PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dir)).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            ids, labels = torch.tensor([e.input_ids]), torch.tensor([e.labels])
            logits = model(input_ids=ids).logits[0, :-1].float()
            target = labels[0, 1:]
            total += float(torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
    return total / count


def test_plain_peft_loads_output_dir_and_every_checkpoint(full_run, tiny_llama, data):
    """The validation loss the training model logged at steps 3 and 6 is reproduced by plain PEFT from
    checkpoint-3, checkpoint-6 and output_dir (the model as it was at the end of training)."""
    from loraforge.data.dataset import build_datasets
    from loraforge.models.loader import load_tokenizer

    out, opts = full_run
    cfg = make_cfg(tiny_llama, data[0], out, **opts)
    val = build_datasets(cfg, load_tokenizer(tiny_llama)).val
    logged = val_losses(out)
    for where, step in [(out / "checkpoint-3", 3), (out / "checkpoint-6", 6), (out, 6)]:
        assert _plain_peft_val_loss(tiny_llama, where, val) == pytest.approx(logged[step], abs=1e-5), where
    assert logged[3] != logged[6]  # the two adapters differ: each check is specific
