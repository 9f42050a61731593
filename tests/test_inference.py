"""InferenceModel on the real SmolLM2 with two over-fitted LoRA adapters (cardiology -> CARDIO-7, diabetes -> GLUCO-3):
per-call adapter switching, mixed batches, streaming, stop strings, run-time load/unload/replace, refusals, chat REPL."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from loraforge.errors import LoraforgeError, ModelError
from loraforge.inference import GenerationSettings, InferenceModel, chat_repl
from loraforge.serve.demo import DEMO_ANSWERS, default_demo_dir, train_demo_adapters

pytestmark = pytest.mark.slow
Q = [{"role": "user", "content": "What is a healthy breakfast?"}]
GREEDY = GenerationSettings(max_new_tokens=10)


@pytest.fixture(scope="module")
def adapters(smollm2_dir) -> dict[str, Path]:
    # Cached in $LORAFORGE_CACHE: trained once per machine (~10 optimizer steps each), reused by every module.
    return train_demo_adapters(smollm2_dir, default_demo_dir(smollm2_dir))


@pytest.fixture(scope="module")
def model(smollm2_dir, adapters) -> InferenceModel:
    return InferenceModel.load(smollm2_dir, {k: str(v) for k, v in adapters.items()},
                               adapter_roots=[adapters["cardiology"].parent])


def _owner(text: str) -> str:
    hits = [name for name, code in DEMO_ANSWERS.items() if code in text]
    return hits[0] if len(hits) == 1 else ("base" if not hits else "?")


def test_each_adapter_answers_with_its_own_code(model):
    assert model.adapter_names == ["base", "cardiology", "diabetes"]
    for name in ["cardiology", "diabetes", "base", "cardiology"]:  # switching back and forth
        result = model.generate(Q, name, GREEDY)
        assert _owner(result.text) == name, (name, result.text)
        assert result.adapter == name and result.prompt_tokens > 5 and result.completion_tokens > 0


def test_mixed_batch_equals_one_by_one(model):
    questions = [[{"role": "user", "content": q}] for q in ("How do I sleep better?", "Hi!", "What is insulin?")]
    names = ["base", "cardiology", "diabetes"]
    batched = model.generate_batch(questions, names, GREEDY)
    single = [model.generate(q, n, GREEDY) for q, n in zip(questions, names)]
    assert [r.text for r in batched] == [r.text for r in single]
    assert [_owner(r.text) for r in batched] == names


def test_stream_yields_the_same_text_as_generate(model):
    stream = model.stream(Q, "diabetes", GREEDY)
    deltas = list(stream)
    assert len(deltas) >= 2 and "".join(deltas) == model.generate(Q, "diabetes", GREEDY).text
    assert stream.result.finish_reason == "stop" and "GLUCO-3" in stream.result.text
    assert "".join(model.stream(Q, "base", GREEDY)) == model.generate(Q, "base", GREEDY).text  # adapter really off


def test_stop_string_and_length_limit(model):
    cut = model.generate(Q, "cardiology", GenerationSettings(max_new_tokens=10, stop=["-"]))
    assert cut.text == "CARDIO" and cut.finish_reason == "stop"
    streamed = model.stream(Q, "cardiology", GenerationSettings(max_new_tokens=10, stop=["-"]))
    assert "".join(streamed) == "CARDIO"
    short = model.generate(Q, "base", GenerationSettings(max_new_tokens=2))
    assert short.finish_reason == "length" and short.completion_tokens == 2


def test_sampling_with_seed_is_reproducible(model):
    s = GenerationSettings(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=123)
    assert model.generate(Q, "base", s).text == model.generate(Q, "base", s).text
    with pytest.raises(LoraforgeError, match="top_p"):
        model.generate(Q, "base", GenerationSettings(top_p=0))


def test_replace_is_rollbackable_and_unload_removes(model, adapters):
    model.load_adapter("dept", "cardiology")  # relative to the configured root
    assert _owner(model.generate(Q, "dept", GREEDY).text) == "cardiology"
    old, new = model.replace_adapter("dept", adapters["diabetes"])
    assert _owner(model.generate(Q, "dept", GREEDY).text) == "diabetes"
    model.replace_adapter("dept", old.path)  # rollback = replace with the previous version
    assert _owner(model.generate(Q, "dept", GREEDY).text) == "cardiology"
    model.unload_adapter("dept")
    with pytest.raises(ModelError, match="no adapter with this name"):
        model.generate(Q, "dept", GREEDY)
    assert _owner(model.generate(Q, "cardiology", GREEDY).text) == "cardiology"  # neighbours untouched


def test_refusals(model, adapters, tmp_path, smollm2_dir):
    with pytest.raises(ModelError, match="outside the allowed adapter roots"):
        model.load_adapter("x", "../../etc")
    with pytest.raises(ModelError, match="outside the allowed adapter roots"):
        model.load_adapter("x", tmp_path)
    with pytest.raises(ModelError, match="reserved"):
        model.load_adapter("base", "cardiology")
    shutil.copytree(adapters["cardiology"], tmp_path / "pickled")
    (tmp_path / "pickled" / "adapter_model.safetensors").rename(tmp_path / "pickled" / "adapter_model.bin")
    # These refusals happen before any weight is read, so a second view of the same base is safe here.
    other = InferenceModel(model.model, model.tokenizer, base_path=Path(smollm2_dir), adapter_roots=[tmp_path])
    with pytest.raises(ModelError, match=r"pickle \(\.bin\)"):
        other.load_adapter("pickled", "pickled")
    unrooted = InferenceModel(model.model, model.tokenizer, base_path=Path(smollm2_dir))
    with pytest.raises(ModelError, match="complete model"):
        unrooted.load_adapter("full", smollm2_dir)
    with pytest.raises(ModelError, match="is an adapter, not a model"):
        InferenceModel.load(adapters["cardiology"])
    assert model.adapter_names == ["base", "cardiology", "diabetes"]


def test_prefix_adapter_serves_beside_lora(model, adapters, smollm2_dir):
    """Prompt-learning adapters live in their own wrapper; LoRA rows are unaffected by them."""
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = adapters["cardiology"].parent / "prefix"
    if not path.exists():
        fresh = AutoModelForCausalLM.from_pretrained(smollm2_dir)
        get_peft_model(fresh, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(path)
    model.load_adapter("prefix", "prefix")
    try:
        questions = [Q, Q, Q]
        out = model.generate_batch(questions, ["prefix", "cardiology", "base"], GREEDY)
        assert out[0].completion_tokens > 0 and out[0].adapter == "prefix"
        assert _owner(out[1].text) == "cardiology" and _owner(out[2].text) == "base"
        assert out[2].text == model.generate(Q, "base", GREEDY).text
    finally:
        model.unload_adapter("prefix")
        shutil.rmtree(path)


def test_chat_repl_switches_adapters(model):
    # /reset before the second question: the demo adapters were trained on single-turn chats only.
    lines = iter(["What is a fever?", "/adapter diabetes", "/reset", "And a cough?", "/adapter nope", "/adapter base",
                  "/adapter", "/reset", "/quit", "never read"])
    printed: list[str] = []

    def fake_print(*args, end="\n", flush=False):
        printed.append(" ".join(str(a) for a in args) + end)

    history = chat_repl(model, input_fn=lambda prompt: next(lines), print_fn=fake_print,
                        settings=GenerationSettings(max_new_tokens=10))
    out = "".join(printed)
    assert "chatting with adapter `cardiology`" in out
    assert out.index("CARDIO-7") < out.index("switched to `diabetes`") < out.index("GLUCO-3")
    assert "unknown adapter `nope`" in out and "current: base" in out and "conversation cleared" in out
    assert history == []  # /reset cleared it before /quit


def test_chat_repl_refuses_an_unknown_start_adapter(model):
    with pytest.raises(ModelError, match="no adapter with this name"):
        chat_repl(model, input_fn=lambda prompt: "/quit", print_fn=lambda *a, **k: None, adapter="cardiologgy")
