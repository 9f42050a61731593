"""One contract every fine-tuning method passes, for every task type it applies to (PEFT's test-matrix idea).

The matrix is every registered method (`loraforge.methods.METHODS`) × every text task type, less the combinations
measured broken (`REFUSED`): a new method enters it by being registered, and fails until this file says what
it must train (`_expected_trainable`, `LR`, `_config`).

For each method × task type, on tiny random models (LLaMA for decoder tasks, T5 for SEQ_2_SEQ_LM):
1. exactly the configured parameters are trainable (`trainable_report` + `verify_trainable`, and by name);
2. the loss falls when over-fitting a few examples;
3. save → load with *plain* PEFT / transformers reproduces the outputs exactly;
4. merging (LoRA) gives the unmerged outputs;
5. generative tasks: batched generation equals one-by-one generation.
Combinations measured broken with the installed peft/transformers are refused in preflight (`check`) and by
`apply`, and that refusal is part of the contract too.
"""

from __future__ import annotations

import json
import re

import pytest

torch = pytest.importorskip("torch")

from loraforge.config import TaskType, config_from_dict  # noqa: E402
from loraforge.errors import ConfigError  # noqa: E402
from loraforge.methods import METHODS  # noqa: E402

C, S2S, CLS, TOK, QA, FE = (TaskType.CAUSAL_LM, TaskType.SEQ_2_SEQ_LM, TaskType.SEQ_CLS, TaskType.TOKEN_CLS,
                            TaskType.QUESTION_ANSWERING, TaskType.FEATURE_EXTRACTION)
ALL = tuple(METHODS)
# task type → the tiny family the contract runs on
FAMILY: dict[TaskType, str] = {C: "llama", S2S: "t5", CLS: "llama", TOK: "llama", QA: "llama", FE: "llama"}
# Measured broken with the installed peft/transformers: refused in preflight (`check`) and by `apply` instead.
REFUSED = [("prompt", CLS), ("ptuning", CLS), ("prompt", TOK), ("ptuning", TOK), ("prompt", QA), ("ptuning", QA)]
# task type → (tiny family, methods that must pass the contract)
MATRIX: dict[TaskType, tuple[str, tuple[str, ...]]] = {
    task: (family, tuple(m for m in ALL if (m, task) not in REFUSED)) for task, family in FAMILY.items()}
# High rates: tiny random models start near log(vocab) ≈ 10.8 and must visibly over-fit in a few steps.
# LoRA/QLoRA adapt every block linear by default (issue 14): 7 adapted linears per block instead of q/v alone,
# so one Adam step at 1e-1 moves the outputs several times further and the loss oscillates (SEQ_CLS: 1.155 →
# 0.124 → 0.578 → ...; QA: 2.627 → 1.411 → 2.319 → 4.018 ...); at 1e-2 both fall monotonically to ~0 in 12 steps.
LR = {"lora": 1e-2, "qlora": 1e-2, "prefix": 1e-1, "ptuning": 1e-1, "prompt": 3e-1, "freeze": 1e-2, "full": 1e-2}
STEPS = 12

ROWS: dict[TaskType, list[dict]] = {
    C: [{"instruction": "Name a colour.", "output": "Blue."}, {"instruction": "Say hi.", "output": "Hello there!"},
        {"instruction": "Count to three.", "output": "One, two, three."}, {"instruction": "Yes or no?", "output": "No."}],
    S2S: [{"input": "red", "output": "rouge"}, {"input": "green cat", "output": "chat vert"},
          {"instruction": "Translate", "input": "dog", "output": "chien"}, {"input": "blue", "output": "bleu"}],
    CLS: [{"text": "I love it", "label": "pos"}, {"text": "terrible, awful", "label": "neg"},
          {"text": "great fun", "label": "pos"}, {"text": "boring and bad", "label": "neg"}],
    TOK: [{"tokens": ["Anna", "lives", "in", "Rome"], "tags": ["PER", "O", "O", "LOC"]},
          {"tokens": ["Paris", "is", "big"], "tags": ["LOC", "O", "O"]},
          {"tokens": ["Bob", "met", "Alice"], "tags": ["PER", "O", "PER"]},
          {"tokens": ["Go", "to", "Oslo"], "tags": ["O", "O", "LOC"]}],
    QA: [{"context": "The cat sat on the mat.", "question": "Where did the cat sit?", "answer": "on the mat"},
         {"context": "Water boils at 100 degrees.", "question": "When does water boil?", "answer": "100 degrees"},
         {"context": "Tom is 12 years old.", "question": "Who is 12?", "answer": "Tom"},
         {"context": "The sky is blue today.", "question": "What colour is the sky?", "answer": "blue"}],
    FE: [{"anchor": "a small cat", "positive": "a little kitten"}, {"anchor": "a red car", "positive": "a crimson auto"},
         {"anchor": "hot coffee", "positive": "a warm espresso"}, {"anchor": "the blue sea", "positive": "ocean water"}],
}


def _matrix():
    for task, (family, methods) in MATRIX.items():
        for method in methods:
            yield pytest.param(method, task, family, id=f"{task.value}-{method}")


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("contract")


# At the default init (std 0.02) a hidden-size-32 model's activations are so small that virtual tokens barely
# move its outputs; a wider init makes every method's over-fitting visible within a few steps.
INIT = {"llama": {"initializer_range": 0.2}, "t5": {}}


def _tiny_dir(family: str, root, task: TaskType, num_labels: int | None = None):
    """Like `models.tiny.tiny_model_dir` (SmolLM2 tokenizer, seeded weights) with the wider init above."""
    import transformers

    from loraforge.models.gguf import resolve_model_path
    from loraforge.models.loader import AUTO_CLASSES
    from loraforge.models.tiny import tiny_config

    out = root / f"{family}-{task.value}-{num_labels}"
    if (out / "config.json").is_file():
        return out
    tok = transformers.AutoTokenizer.from_pretrained(resolve_model_path("smollm2"))
    config = tiny_config(family, len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, **({"num_labels": num_labels} if num_labels else {}),
                         **INIT[family])
    if config.is_encoder_decoder:
        config.decoder_start_token_id = tok.pad_token_id
    torch.manual_seed(0)
    getattr(transformers, AUTO_CLASSES[task]).from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _config(method: str, task: TaskType, data_file, **kw):
    base = {"method": method, "task_type": task.value, "metadata_path": str(data_file), "learning_rate": LR[method],
            "cutoff_len": 64, "max_grad_norm": None}
    if method in ("lora", "qlora"):
        base["lora_dropout"] = 0.0
    if method in ("prefix", "ptuning", "prompt"):
        base["num_virtual_tokens"] = 4
    if method == "qlora":
        base["bnb_4bit_compute_dtype"] = "float32"
    if method == "freeze":
        base["freeze_trainable_layers"] = 1
    return config_from_dict({**base, **kw})


def _data(cfg, tokenizer):
    from loraforge.objectives import build_data

    return build_data(cfg, tokenizer)


def _batch(cfg, data, tokenizer) -> dict:
    from loraforge.objectives import objective_for

    idx = [[i] for i in range(len(data.train))]
    return objective_for(cfg).collate(data.train, idx, tokenizer.pad_token_id, cfg)


def _loss_module(model, cfg):
    from loraforge.objectives import objective_for

    return objective_for(cfg).loss(model, cfg)


def _mean_loss(loss_module, batch) -> float:
    loss_module.eval()
    with torch.no_grad():
        s, n = loss_module(**batch)
    return (s / n).item()


def _model_inputs(batch) -> dict:
    return {k: v for k, v in batch.items() if k != "num_targets"}


def _outputs(model, task, batch) -> torch.Tensor:
    """The task's main output tensor, in eval mode."""
    from loraforge.objectives.contrastive import embed

    model.eval()
    inputs = _model_inputs(batch)
    with torch.no_grad():
        if task is FE:
            return embed(model, inputs["input_ids"], inputs["attention_mask"])
        if task is QA:
            inputs = {k: v for k, v in inputs.items() if not k.endswith("_positions")}
            out = model(**inputs)
            return torch.cat([out.start_logits, out.end_logits], dim=-1)
        if task is C:
            inputs = {k: v for k, v in inputs.items() if k != "labels"}
        return model(**inputs).logits


def _plain_base(model_dir, task, cfg):
    """The base model through plain transformers (what a user without loraforge would write)."""
    import transformers

    from loraforge.models.loader import AUTO_CLASSES

    kw = {}
    if cfg.method == "qlora":
        from loraforge.methods.qlora import quantization_config

        kw["quantization_config"] = quantization_config(cfg)
    return getattr(transformers, AUTO_CLASSES[task]).from_pretrained(model_dir, dtype=torch.float32, **kw)


def _expected_trainable(method, names: list[str]) -> set[str]:
    """What must train, by parameter name, for each method (independent of the method modules' own logic)."""
    if method in ("lora", "qlora"):
        return {n for n in names if ".lora_" in n or "modules_to_save" in n}
    if method in ("prefix", "ptuning", "prompt"):
        return {n for n in names if "prompt_encoder" in n or "modules_to_save" in n}
    if method == "full":
        return set(names)
    raise AssertionError(method)


# ---------------------------------------------------------------------------------------------- the contract


@pytest.mark.parametrize(("method", "task", "family"), list(_matrix()))
def test_contract(method, task, family, root, tmp_path):
    from loraforge.data.tasks import infer_label_names
    from loraforge.methods import apply_method, is_adapter_method, verify_trainable
    from loraforge.methods.report import trainable_report
    from loraforge.models.loader import load_model, load_tokenizer
    data_file = tmp_path / "train.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in ROWS[task]))
    cfg = _config(method, task, data_file)
    labels = infer_label_names(cfg)
    model_dir = _tiny_dir(family, root, task, num_labels=len(labels) if labels else None)
    tokenizer = load_tokenizer(model_dir)
    data = _data(cfg, tokenizer)
    batch = _batch(cfg, data, tokenizer)

    # -- build: base (+ the method's load-time kwargs: quantization) → method
    from loraforge.models.discovery import load_hf_config

    extra = METHODS[method].load_kwargs(cfg, load_hf_config(model_dir))
    torch.manual_seed(0)
    model = load_model(model_dir, task, dtype="float32", **extra)
    model = apply_method(model, cfg)

    # 1. exactly the configured parameters train
    report = trainable_report(model)
    assert not verify_trainable(report, cfg)
    names = [n for n, _ in model.named_parameters()]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if method == "freeze":
        last = {n for n in names if re.search(r"(^|\.)(layers|block)\.1\.", n)}
        heads = {n for n in names if n.startswith(("score.", "qa_outputs."))}
        assert trainable == last | heads, sorted(trainable ^ (last | heads))[:5]
    else:
        assert trainable == _expected_trainable(method, names), sorted(trainable ^ _expected_trainable(method, names))[:5]
    if task in (CLS, TOK, QA) and is_adapter_method(method):
        assert any("modules_to_save" in n for n in trainable), "the new task head must train and be saved"

    # 2. the loss falls when over-fitting the examples
    loss_module = _loss_module(model, cfg)
    before = _mean_loss(loss_module, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    for _ in range(STEPS):
        loss_module.train()
        s, n = loss_module(**batch)
        (s / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = _mean_loss(loss_module, batch)
    # over-fitting: down by 15%, or by 0.3 nats for LM losses that start near log(vocab) ≈ 10.8
    assert after < before - min(0.3, 0.15 * before), f"loss did not fall: {before:.4f} → {after:.4f}"

    # 3. save → load with plain PEFT / transformers reproduces the outputs exactly
    want = _outputs(model, task, batch)
    out_dir = tmp_path / "out"
    model.save_pretrained(out_dir)
    if is_adapter_method(method):
        from peft import PeftModel

        assert (out_dir / "adapter_config.json").is_file() and (out_dir / "adapter_model.safetensors").is_file()
        loaded = PeftModel.from_pretrained(_plain_base(model_dir, task, cfg), out_dir)
        if method == "qlora":
            from loraforge.methods.qlora import disable_cpu_inference_repack

            disable_cpu_inference_repack(loaded)
    else:
        import transformers

        from loraforge.models.loader import AUTO_CLASSES

        tokenizer.save_pretrained(out_dir)
        loaded = getattr(transformers, AUTO_CLASSES[task]).from_pretrained(out_dir, dtype=torch.float32)
        assert transformers.AutoTokenizer.from_pretrained(out_dir).chat_template == tokenizer.chat_template
    got = _outputs(loaded, task, batch)
    assert torch.equal(got, want), f"reloaded outputs differ by {(got - want).abs().max():.3g}"

    # 4. merging LoRA into the base gives the same outputs (4-bit bases are merged by export after dequantizing)
    if method == "lora":
        merged = loaded.merge_and_unload()
        assert not any(".lora_" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(_outputs(merged, task, batch), want, atol=1e-4, rtol=1e-4)

    # 5. batched generation == one-by-one generation
    if task in (C, S2S):
        _check_batched_generation(loaded if method != "lora" else model, task, tokenizer, method)


PROMPTS = ["Name a colour.", "Count to three, then say hello to everyone in the room."]


def _generate(model, tokenizer, rows: list[list[int]], *, left: bool) -> list[list[int]]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=None, use_cache=True)
    return out[:, width:].tolist() if left and not model.config.is_encoder_decoder else out.tolist()


def _check_batched_generation(model, task, tokenizer, method):
    model.eval()
    rows = [tokenizer(p)["input_ids"] for p in PROMPTS]
    decoder_only = task is C
    if decoder_only and method in ("prefix", "ptuning", "prompt"):
        # FINDINGS trap 5: PEFT drops position_ids for prompt learning, so left padding shifts the real tokens'
        # positions relative to the virtual tokens / prefix and the padded row's output changes. loraforge's
        # inference runs these adapters one row at a time; batching rows of equal length (no padding) is exact.
        same_len = [rows[0], list(reversed(rows[0]))]
        assert _generate(model, tokenizer, same_len, left=True) == \
            [_generate(model, tokenizer, [r], left=True)[0] for r in same_len]
        return
    batched = _generate(model, tokenizer, rows, left=decoder_only)
    single = [_generate(model, tokenizer, [r], left=decoder_only)[0] for r in rows]
    assert batched == single


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("method", "task"), REFUSED, ids=[f"{t.value}-{m}" for m, t in REFUSED])
def test_broken_combinations_are_refused_before_training(method, task, root, tmp_path):
    from loraforge.methods import apply_method
    from loraforge.models.discovery import load_hf_config
    from loraforge.models.loader import load_model
    data_file = tmp_path / "train.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in ROWS[task]))
    cfg = _config(method, task, data_file)
    model_dir = _tiny_dir("llama", root, task, num_labels=2 if task in (CLS, TOK) else None)
    problems = METHODS[method].check(cfg, load_hf_config(model_dir))
    assert problems and problems[0].key == "method" and "lora" in problems[0].allowed
    with pytest.raises(ConfigError):
        apply_method(load_model(model_dir, task, dtype="float32"), cfg)


def test_seq2seq_on_a_decoder_only_model_is_refused(tmp_path, root):
    """Preflight's task-type check reports it for every method (so `check` does not repeat it); `apply` refuses
    it too, before prefix tuning would crash at the first forward (FINDINGS trap 6)."""
    from loraforge.methods import prefix
    from loraforge.methods.prompt import prompt_learning_problems
    from loraforge.models.discovery import load_hf_config
    from loraforge.models.registry import check_task_type

    data_file = tmp_path / "train.jsonl"
    data_file.write_text(json.dumps(ROWS[S2S][0]) + "\n")
    cfg = _config("prefix", S2S, data_file)
    hf_config = load_hf_config(_tiny_dir("llama", root, C))
    assert [p.key for p in check_task_type(hf_config, S2S)] == ["task_type"]
    assert prefix.check(cfg, hf_config) == []
    problems = prompt_learning_problems(cfg, hf_config)
    assert [p.key for p in problems] == ["task_type"] and "decoder-only" in problems[0].message


def test_prompt_learning_on_encoder_decoder_needs_seq2seq(tmp_path, root):
    from loraforge.methods import ptuning
    from loraforge.models.discovery import load_hf_config
    data_file = tmp_path / "train.jsonl"
    data_file.write_text(json.dumps(ROWS[CLS][0]) + "\n")
    cfg = _config("ptuning", CLS, data_file, label_names=["neg", "pos"])
    problems = ptuning.check(cfg, load_hf_config(_tiny_dir("t5", root, S2S)))
    assert problems[0].key == "task_type" and problems[0].allowed == "SEQ_2_SEQ_LM"


