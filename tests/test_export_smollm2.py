"""Exports of a real LoRA run on SmolLM2 run in llama.cpp with loraforge's own answers (issue 16).

The run is the cached demo adapter (`cardiology`, trained to answer with the code word CARDIO-7). llama.cpp
(`llama-cpp-python`, scripts/llama_cpp.sh) is the consumer: the merged GGUF (f16, and q8_0 loosely), and the
base GGUF with the GGUF LoRA applied, must produce loraforge `generate`'s greedy answers token for token —
from our prompt ids, and from llama.cpp's own chat formatting with the chat template stored in the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from loraforge.exporters import export

pytestmark = pytest.mark.slow
PROMPTS = ["What are the symptoms of high blood pressure?", "How are you today?", "Write one sentence about the sea."]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama.cpp consumer absent: run scripts/llama_cpp.sh")


@pytest.fixture(scope="module")
def run_dir(smollm2_dir):
    from loraforge.serve.demo import default_demo_dir, train_demo_adapters

    return train_demo_adapters(smollm2_dir, default_demo_dir(smollm2_dir))["cardiology"]


@pytest.fixture(scope="module")
def reference(smollm2_dir, run_dir):
    """loraforge's own greedy answers (text and prompt ids) with the adapter applied."""
    from loraforge.inference import GenerationSettings, InferenceModel

    model = InferenceModel.load(smollm2_dir, {"cardio": str(run_dir)})
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS, temperature=0.0)
    out = []
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        out.append((model.prompt_ids(messages, "cardio"), model.generate(messages, "cardio", settings=settings).text))
    assert "CARDIO-7" in out[0][1]
    return out, model.tokenizer


@pytest.fixture(scope="module")
def exports(tmp_path_factory, run_dir, smollm2_dir):
    root = tmp_path_factory.mktemp("exports")
    ollama = export(run_dir, "ollama", root / "ollama", quant="f16", progress=False)
    export(run_dir, "gguf", root / "q8", quant="q8_0", progress=False)
    export(smollm2_dir, "gguf", root / "base", quant="f16", progress=False)
    base_gguf = next((root / "base").glob("*.gguf"))
    export(run_dir, "gguf-lora", root / "lora", base_gguf=str(base_gguf), progress=False)
    return {"root": root, "ollama": ollama, "f16": next((root / "ollama").glob("*.gguf")),
            "q8": next((root / "q8").glob("*.gguf")), "base": base_gguf, "lora": next((root / "lora").glob("*.gguf"))}


def _greedy(llama_cpp, path: Path, prompt_ids: list[int], tokenizer, lora: Path | None = None) -> str:
    # logits_all: llama-cpp-python fills `scores` only then (0.3.36)
    llm = llama_cpp.Llama(str(path), n_ctx=512, verbose=False, n_threads=2, logits_all=True,
                          lora_path=str(lora) if lora else None)
    try:
        end = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
        llm.eval(prompt_ids)
        new = []
        for _ in range(NEW_TOKENS):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if token in end:
                break
            new.append(token)
            llm.eval([token])
        return tokenizer.decode(new, skip_special_tokens=True)
    finally:
        llm.close()


def test_llama_cpp_answers_like_loraforge_from_the_merged_gguf(llama_cpp, exports, reference):
    (rows, tokenizer) = reference
    for prompt_ids, expected in rows:
        assert _greedy(llama_cpp, exports["f16"], prompt_ids, tokenizer).strip() == expected.strip()
    # q8_0: 8-bit weights (llama.cpp also rounds activations to 8 bits) — the learned answer survives.
    assert "CARDIO-7" in _greedy(llama_cpp, exports["q8"], rows[0][0], tokenizer)


def test_llama_cpp_chat_uses_the_template_inside_the_gguf(llama_cpp, exports, reference):
    """llama-cpp-python formats the chat with the file's `tokenizer.chat_template` itself."""
    (rows, _) = reference
    llm = llama_cpp.Llama(str(exports["f16"]), n_ctx=512, verbose=False, n_threads=2)
    try:
        reply = llm.create_chat_completion([{"role": "user", "content": PROMPTS[0]}], temperature=0.0,
                                           max_tokens=NEW_TOKENS)
    finally:
        llm.close()
    assert reply["choices"][0]["message"]["content"].strip() == rows[0][1].strip()


def test_gguf_lora_on_the_base_gguf_answers_like_the_adapter(llama_cpp, exports, reference):
    (rows, tokenizer) = reference
    for prompt_ids, expected in rows:
        assert _greedy(llama_cpp, exports["base"], prompt_ids, tokenizer, lora=exports["lora"]).strip() == expected.strip()
    assert "CARDIO-7" not in _greedy(llama_cpp, exports["base"], rows[0][0], tokenizer)  # the base alone does not


def test_modelfile_points_at_the_gguf_with_stop_lines(exports):
    text = (exports["root"] / "ollama" / "Modelfile").read_text()
    assert f"FROM ./{exports['f16'].name}\n" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'TEMPLATE """' in text
    assert "ollama create" in exports["ollama"].format()


def test_transformers_reads_the_f16_gguf_back(exports, run_dir, smollm2_dir, reference):
    """An implementation independent of both writer and llama.cpp: transformers' GGUF loader, f16 vs the
    merged fp32 model (within f16 rounding)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    (rows, _) = reference
    ids = torch.tensor([rows[0][0]])
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_dir), str(run_dir)).merge_and_unload()
    loaded = AutoModelForCausalLM.from_pretrained(exports["f16"].parent, gguf_file=exports["f16"].name,
                                                  dtype=torch.float32)
    with torch.no_grad():
        a, b = merged(ids).logits, loaded(ids).logits
    assert (a - b).abs().max().item() < 0.25 and torch.equal(a.argmax(-1), b.argmax(-1))
