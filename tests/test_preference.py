"""Preference stages end to end: the row shapes and their `file:line` errors, prompt masking, preflight's
refusals, the reference choices (adapter disabled, frozen copy, precomputed) and a tiny DPO / KTO run writing
the reward metrics. The losses themselves are checked against TRL in test_preference_trl.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from loraforge.config import config_from_dict  # noqa: E402
from loraforge.errors import DataError, LoraforgeError  # noqa: E402

PAIRS = [{"instruction": f"Question {i}?", "chosen": f"A careful answer {i}.", "rejected": f"Wrong {i}!"}
         for i in range(8)]


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from loraforge.models.tiny import tiny_model_dir

    return tiny_model_dir("llama", tmp_path_factory.mktemp("pref"))


def cfg(tmp_path: Path, data: Path, model_dir: Path, **keys):
    return config_from_dict({"base_model": str(model_dir), "metadata_path": str(data), "tokenized_cache": False,
                             "output_dir": str(tmp_path / "out"), "precision": "fp32", **keys})


def test_every_row_shape_gives_the_same_pair(tmp_path, model_dir):
    """alpaca, chat `messages` and ranking `conversations` rows of one pair encode identically; only the replies
    carry labels, and the two sides share the prompt tokens."""
    from loraforge.data.preference import build_preference_data
    from loraforge.models.loader import load_tokenizer

    rows = [{"instruction": "Is it safe?", "chosen": "Ask a doctor.", "rejected": "Sure, always."},
            {"messages": [{"role": "user", "content": "Is it safe?"}],
             "chosen": {"role": "assistant", "content": "Ask a doctor."}, "rejected": "Sure, always."},
            {"conversations": [{"from": "human", "value": "Is it safe?"}], "chosen": {"from": "gpt", "value": "Ask a doctor."},
             "rejected": {"from": "gpt", "value": "Sure, always."}}]
    tokenizer = load_tokenizer(model_dir)
    data = build_preference_data(cfg(tmp_path, write(tmp_path / "p.jsonl", rows), model_dir, stage="dpo"), tokenizer)
    first = data.train[0]
    for ex in data.train[1:]:
        assert ex.chosen.input_ids == first.chosen.input_ids and ex.rejected.labels == first.rejected.labels
    c, r = first.chosen, first.rejected
    prompt = next(i for i, t in enumerate(c.labels) if t != -100)
    assert c.input_ids[:prompt] == r.input_ids[:prompt]  # the shared prompt …
    assert set(c.labels[:prompt]) == {-100} and set(r.labels[:prompt]) == {-100}  # … is never scored
    assert "Ask a doctor." in tokenizer.decode([t for t in c.labels if t != -100])
    assert "Sure, always." in tokenizer.decode([t for t in r.labels if t != -100])
    assert first.input_ids == c.input_ids + r.input_ids  # what batching measures and packs: both sides


def test_bad_rows_are_reported_with_file_and_line(tmp_path, model_dir):
    from loraforge.data.preference import load_preference_rows

    rows = [{"instruction": "q", "chosen": "a"},  # line 1: no rejected
            {"instruction": "q", "chosen": " ", "rejected": "b"},  # 2: empty chosen
            {"instruction": "q", "chosen": "same", "rejected": "same"},  # 3: chosen == rejected
            {"instruction": "q", "chosen": "a", "rejected": "b"}]  # 4: fine
    path = write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_preference_rows([path], cfg(tmp_path, path, model_dir, stage="dpo"))
    found = {(p.key, p.message) for p in info.value.problems}
    assert found == {(f"{path}:1", "missing `rejected`"), (f"{path}:2", "empty `chosen`"),
                     (f"{path}:3", "`chosen` and `rejected` are the same reply")}
    kto = write(tmp_path / "kto.jsonl", [{"instruction": "q", "output": "a", "label": "yes"},
                                         {"instruction": "q", "output": "a"}, {"instruction": "q", "output": "a", "kto_tag": False}])
    with pytest.raises(DataError) as info:
        load_preference_rows([kto], cfg(tmp_path, kto, model_dir, stage="kto"))
    assert [(p.key, p.message) for p in info.value.problems] == [
        (f"{kto}:1", "`label` must be true or false"), (f"{kto}:2", "missing `label` (or `kto_tag`)")]


def test_preflight_refuses_virtual_token_methods_and_checks_pair_rows(tmp_path, model_dir):
    from loraforge.preflight import run_preflight

    good = write(tmp_path / "p.jsonl", PAIRS)
    with pytest.raises(LoraforgeError) as info:
        run_preflight(cfg(tmp_path, good, model_dir, stage="dpo", method="prompt"), echo=lambda _m: None)
    problem = next(p for p in info.value.problems if p.key == "method")
    assert problem.value == "prompt" and "lora" in problem.allowed and "virtual tokens" in problem.message
    bad = write(tmp_path / "b.jsonl", [{"instruction": "q", "chosen": "a", "rejected": "a"}])
    with pytest.raises(LoraforgeError) as info:
        run_preflight(cfg(tmp_path, bad, model_dir, stage="orpo"), echo=lambda _m: None)
    assert [p.key for p in info.value.problems] == [f"{bad}:1"]
    run_preflight(cfg(tmp_path, good, model_dir, stage="simpo", method="full"), echo=lambda _m: None)


def test_estimate_counts_a_reference_copy_only_when_one_is_kept(tmp_path, model_dir):
    from loraforge.estimate import estimate_memory

    data = write(tmp_path / "p.jsonl", PAIRS)
    est = {k: estimate_memory(cfg(tmp_path, data, model_dir, **keys), baseline_bytes=0, device="cpu")
           for k, keys in {"lora": dict(stage="dpo"), "full": dict(stage="dpo", method="full"),
                           "orpo": dict(stage="orpo", method="full"),
                           "pre": dict(stage="dpo", method="full", pref_reference="precomputed")}.items()}
    assert est["full"].reference_bytes == est["full"].weights_bytes > 0
    assert est["lora"].reference_bytes == est["orpo"].reference_bytes == est["pre"].reference_bytes == 0
    assert any("adapter disabled" in n for n in est["lora"].notes)


@pytest.mark.parametrize("stage,method,reference", [("dpo", "lora", "auto"), ("dpo", "full", "auto"),
                                                    ("kto", "lora", "auto")])
def test_training_logs_reward_metrics_and_records_the_stage(stage, method, reference, tmp_path, model_dir):
    from loraforge.train.loop import train

    rows = PAIRS if stage != "kto" else [{"instruction": f"Q{i}?", "output": f"A{i}.", "label": i % 2 == 0}
                                         for i in range(8)]
    data = write(tmp_path / "d.jsonl", rows)
    run = cfg(tmp_path, data, model_dir, stage=stage, method=method, pref_reference=reference, max_steps=4,
              batch_size=2, logging_steps=2, val_size=2, eval_steps=4, learning_rate=1e-3, save_steps=2)
    result = train(run, echo=lambda _m: None)
    out = Path(run.output_dir)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rec = [r for r in records if "loss" in r]
    val_rec = [r for r in records if "val_loss" in r]
    assert len(train_rec) == 2 and len(val_rec) == 1
    keys = {"rewards/chosen", "rewards/rejected", "kl"} if stage == "kto" else \
        {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}
    assert keys <= set(train_rec[-1])
    # the 2 held-out KTO rows may all share one label: only the metrics of the labels present are logged
    val_keys = {"val_kl"} if stage == "kto" else {"val_" + k for k in keys}
    assert val_keys <= set(val_rec[0])
    if stage == "dpo":  # step 1's policy is the reference: its DPO loss is log 2 and its margins 0
        assert train_rec[-1]["rewards/margins"] == pytest.approx(
            train_rec[-1]["rewards/chosen"] - train_rec[-1]["rewards/rejected"], abs=1e-6)
    info = json.loads((out / "run.json").read_text())
    assert info["stage"] == stage and info["objective"] == stage and result.global_step == 4
    # the same metrics in TensorBoard, and loss.png has the reward panel below the loss (a second row)
    from matplotlib.image import imread
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert keys | {"loss"} <= tags and {k.replace("val_", "val/") for k in val_keys} <= tags
    assert {e.step: e.value for e in acc.Scalars("rewards/chosen")} == pytest.approx(
        {r["step"]: r["rewards/chosen"] for r in train_rec}, rel=1e-6)
    height, width = imread(out / "loss.png").shape[:2]
    assert (height, width) == (700, 700)  # 7 × 7 in at 100 dpi; a loss-only plot is 7 × 4
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    assert (out / weights).is_file() and (out / "checkpoint-2").is_dir()


def test_precomputed_reference_equals_the_live_one(tmp_path, model_dir):
    """`pref_reference: precomputed` gives the same first-step losses and gradients as a frozen copy."""
    from loraforge.objectives import objective_for
    from loraforge.objectives.preference import PreferenceLoss
    from loraforge.models.loader import load_model, load_tokenizer
    from loraforge.config import TaskType
    from loraforge.train.attention import register_varlen_attention

    data_file = write(tmp_path / "p.jsonl", PAIRS)
    tokenizer = load_tokenizer(model_dir)
    results = []
    for reference in ("copy", "precomputed"):
        run = cfg(tmp_path, data_file, model_dir, stage="dpo", method="full", pref_reference=reference)
        objective = objective_for(run)
        data = objective.build_data(run, tokenizer)
        torch.manual_seed(0)
        model = load_model(model_dir, TaskType.CAUSAL_LM, dtype="float32")
        model.set_attn_implementation(register_varlen_attention())  # as `train` loads it: packed pairs share prompts
        loss = objective.loss(model, run)
        assert isinstance(loss, PreferenceLoss) and (loss.ref_model is None) == (reference == "precomputed")
        loss.prepare_data(data, objective.collate, tokenizer.pad_token_id)
        with torch.no_grad():  # move the policy off the reference so the log-ratios are not all 0
            model.lm_head.weight.mul_(1.1) if not model.config.tie_word_embeddings else \
                model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
        batch = objective.collate(data.train, [[0, 1], [2]], tokenizer.pad_token_id, run)
        assert ("ref_logps" in batch) == (reference == "precomputed")
        total, n = loss(**batch)
        total.backward()
        results.append((total.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-5, rtol=1e-5)
    assert results[0][0].item() != pytest.approx(3 * 0.6931471805599453, abs=1e-4)  # the policy did move


def test_a_second_run_reads_the_pairs_from_the_tokenized_cache(tmp_path, model_dir, monkeypatch):
    """The same cache SFT uses (same key recipe, plus the kind of rows): a second build tokenizes nothing."""
    import loraforge.data.preference as preference
    from loraforge.data.dataset import build_datasets
    from loraforge.models.loader import load_tokenizer

    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    tokenizer = load_tokenizer(model_dir)
    data = write(tmp_path / "p.jsonl", PAIRS)
    keys = dict(stage="dpo", tokenized_cache=True, val_size=2)
    first = preference.build_preference_data(cfg(tmp_path, data, model_dir, **keys), tokenizer)
    entries = list((tmp_path / "cache" / "tokenized").glob("*/bundle.json"))
    assert not first.cache_hit and len(entries) == 1

    def no_tokenizing(*_a, **_k):
        raise AssertionError("tokenized again")

    with monkeypatch.context() as m:
        m.setattr(preference, "encode_side", no_tokenizing)
        second = preference.build_preference_data(cfg(tmp_path, data, model_dir, stage="simpo", tokenized_cache=True,
                                                      val_size=2), tokenizer)  # simpo reads the same pairs
    assert second.cache_hit and (second.train, second.val, second.stats) == (first.train, first.val, first.stats)
    # another encoding option, KTO rows, or SFT on the same file: their own entries, never the pairs'
    assert not preference.build_preference_data(cfg(tmp_path, data, model_dir, **keys, cutoff_len=300),
                                                tokenizer).cache_hit
    kto = write(tmp_path / "k.jsonl", [{"instruction": f"Q{i}?", "output": f"A{i}.", "label": i % 2 == 0}
                                       for i in range(6)])
    kto_first = preference.build_preference_data(cfg(tmp_path, kto, model_dir, stage="kto", tokenized_cache=True),
                                                 tokenizer)
    kto_again = preference.build_preference_data(cfg(tmp_path, kto, model_dir, stage="kto", tokenized_cache=True),
                                                 tokenizer)
    assert not kto_first.cache_hit and kto_again.cache_hit and kto_again.train == kto_first.train
    sft_rows = write(tmp_path / "s.jsonl", [{"instruction": "Q?", "output": "A."}] * 3)
    sft = build_datasets(cfg(tmp_path, sft_rows, model_dir, tokenized_cache=True), tokenizer)
    assert not sft.cache_hit and build_datasets(cfg(tmp_path, sft_rows, model_dir, tokenized_cache=True),
                                                tokenizer).cache_hit
    assert len(list((tmp_path / "cache" / "tokenized").glob("*/bundle.json"))) == 4
    entries[0].write_text("{damaged", encoding="utf-8")  # rebuilt, never trusted
    assert not preference.build_preference_data(cfg(tmp_path, data, model_dir, **keys), tokenizer).cache_hit


@pytest.mark.parametrize("method", ["lora", "full"])
def test_an_interrupted_dpo_run_resumes_exactly(method, tmp_path, model_dir):
    """Checkpoint at step 3, the rest lost: resuming gives the uninterrupted run's per-step losses and rewards and
    its final weights. With `full` the frozen reference must stay the starting model, not the checkpoint's."""
    import shutil

    from loraforge.train.loop import train

    data = write(tmp_path / "d.jsonl", PAIRS)
    keys = dict(stage="dpo", method=method, max_steps=6, batch_size=2, logging_steps=1, save_steps=3,
                learning_rate=1e-3 if method == "lora" else 1e-4, lr_scheduler="cosine", report_to=["none"],
                plot_loss=False)
    ref_run = cfg(tmp_path / "a", data, model_dir, **keys)
    train(ref_run, echo=lambda _m: None)
    out = Path(ref_run.output_dir)
    resumed = tmp_path / "b" / "out"
    shutil.copytree(out, resumed)
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    shutil.rmtree(resumed / "checkpoint-6")
    (resumed / weights).unlink()
    (resumed / "run.json").unlink()
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    (resumed / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n")  # logged one step past the checkpoint
    train(cfg(tmp_path / "b", data, model_dir, **keys, resume_from_checkpoint="latest", overwrite_output_dir=False),
          echo=lambda _m: None)

    def logged(run_dir):
        recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["rewards/margins"], r["rewards/accuracies"]) for r in recs if "loss" in r]

    a, b = logged(out), logged(resumed)
    assert [s for s, *_ in b] == list(range(1, 7))
    assert a[3][2] != 0  # the policy has moved off the reference by step 4: a wrong reference would show
    for x, y in zip(a, b):
        assert x == pytest.approx(y, abs=1e-5)
    from safetensors.torch import load_file

    wa, wb = load_file(out / weights), load_file(resumed / weights)
    assert max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) < 1e-5


@pytest.mark.parametrize("reference", ["auto", "precomputed"])
def test_dpo_continued_from_an_sft_checkpoint_uses_that_model_as_its_reference(reference, tmp_path, model_dir):
    """The article's flow: SFT (full), then DPO started from that checkpoint (other data, so continued training).
    The reference must be the SFT model the policy starts from: before the first update chosen and rejected
    rewards are exactly 0. Built from the base instead, they would not be."""
    from loraforge.train.loop import train

    sft = write(tmp_path / "sft.jsonl", [{"instruction": f"Question {i}?", "output": f"Wrong {i}!"} for i in range(8)])
    train(cfg(tmp_path / "sft", sft, model_dir, method="full", max_steps=4, batch_size=2, learning_rate=1e-3,
              save_steps=4, report_to=["none"], plot_loss=False), echo=lambda _m: None)
    ckpt = tmp_path / "sft" / "out" / "checkpoint-4"
    data = write(tmp_path / "d.jsonl", PAIRS)
    lines: list[str] = []
    train(cfg(tmp_path / "dpo", data, model_dir, stage="dpo", method="full", pref_reference=reference, max_steps=1,
              batch_size=2, logging_steps=1, learning_rate=1e-4, report_to=["none"], plot_loss=False,
              resume_from_checkpoint=str(ckpt)), echo=lines.append)
    assert any("continuing from the weights" in line for line in lines)
    first = json.loads((tmp_path / "dpo" / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-6)
    assert first["rewards/rejected"] == pytest.approx(0, abs=1e-6)
