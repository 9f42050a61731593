"""Loading: the right Auto class per task type, dtype, errors before any weight is read; tiny model dirs."""

from __future__ import annotations

import shutil
import time

import pytest
import torch

from loraforge.config.schema import TaskType
from loraforge.errors import ModelError
from loraforge.models.loader import AUTO_CLASSES, load_model, load_tokenizer, resolve_dtype
from loraforge.models.tiny import tiny_model_dir, tiny_remote_config_dir


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="module")
def llama_dir(tiny_root):
    return tiny_model_dir("llama", tiny_root)


def test_auto_classes_cover_every_text_task():
    assert AUTO_CLASSES == {
        TaskType.CAUSAL_LM: "AutoModelForCausalLM", TaskType.SEQ_2_SEQ_LM: "AutoModelForSeq2SeqLM",
        TaskType.SEQ_CLS: "AutoModelForSequenceClassification", TaskType.TOKEN_CLS: "AutoModelForTokenClassification",
        TaskType.QUESTION_ANSWERING: "AutoModelForQuestionAnswering", TaskType.FEATURE_EXTRACTION: "AutoModel"}


@pytest.mark.parametrize("task,cls_name", [
    (TaskType.CAUSAL_LM, "LlamaForCausalLM"), (TaskType.SEQ_CLS, "LlamaForSequenceClassification"),
    (TaskType.TOKEN_CLS, "LlamaForTokenClassification"), (TaskType.QUESTION_ANSWERING, "LlamaForQuestionAnswering"),
    (TaskType.FEATURE_EXTRACTION, "LlamaModel"),
])
def test_llama_loads_the_auto_class_of_each_task(llama_dir, task, cls_name):
    model = load_model(llama_dir, task, num_labels=3 if task in (TaskType.SEQ_CLS, TaskType.TOKEN_CLS) else None)
    assert type(model).__name__ == cls_name
    assert next(model.parameters()).dtype == torch.float32  # auto = fp32 on CPU
    ids = torch.tensor([[1, 5, 9, 2], [1, 7, 2, 2]])
    out = model(input_ids=ids, attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]))
    if task is TaskType.SEQ_CLS:
        assert out.logits.shape == (2, 3) and model.config.pad_token_id == 2
    elif task is TaskType.TOKEN_CLS:
        assert out.logits.shape == (2, 4, 3)


def test_seq2seq_loads_t5(tiny_root):
    model = load_model(tiny_model_dir("t5", tiny_root, TaskType.SEQ_2_SEQ_LM), TaskType.SEQ_2_SEQ_LM)
    assert type(model).__name__ == "T5ForConditionalGeneration"
    out = model(input_ids=torch.tensor([[5, 6, 2]]), labels=torch.tensor([[7, 2]]))
    assert torch.isfinite(out.loss)


def test_bert_classifier_with_labels(tiny_root):
    model = load_model(tiny_model_dir("bert", tiny_root, TaskType.SEQ_CLS), TaskType.SEQ_CLS,
                       id2label={0: "neg", 1: "pos", 2: "neutral"})
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 3 and model.config.label2id == {"neg": 0, "pos": 1, "neutral": 2}


def test_dtype_choices(llama_dir):
    assert resolve_dtype("auto", device_map="cpu") == torch.float32
    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype(torch.float16) == torch.float16
    model = load_model(llama_dir, TaskType.CAUSAL_LM, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ModelError) as info:
        resolve_dtype("float8")
    assert info.value.problems[0].key == "torch_dtype"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_flash_attention_without_cuda(llama_dir):
    with pytest.raises(ModelError) as info:
        load_model(llama_dir, TaskType.CAUSAL_LM, attn_implementation="flash_attention_2")
    assert info.value.problems[0].key == "attn_implementation" and "sdpa" in info.value.problems[0].fix


def test_eager_attention(llama_dir):
    model = load_model(llama_dir, TaskType.CAUSAL_LM, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"


def test_config_overrides_reach_the_config(llama_dir):
    model = load_model(llama_dir, TaskType.CAUSAL_LM, rms_norm_eps=1e-3)
    assert model.config.rms_norm_eps == 1e-3


def test_missing_dir(tmp_path):
    with pytest.raises(ModelError) as info:
        load_model(tmp_path / "nope", TaskType.CAUSAL_LM)
    assert info.value.problems[0].key == "base_model"


def test_task_type_is_refused_before_weights_are_read(llama_dir, tmp_path):
    # A config-only copy: reaching the weights would give a "no weights" error instead of the task error.
    shutil.copy(llama_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelError) as info:
        load_model(tmp_path, TaskType.SEQ_2_SEQ_LM)
    (p,) = info.value.problems
    assert p.key == "task_type" and "CAUSAL_LM" in p.fix
    with pytest.raises(ModelError) as info:
        load_model(tmp_path, TaskType.CAUSAL_LM)
    assert "no weights" in info.value.problems[0].message


def test_causal_lm_on_t5_is_refused(tiny_root):
    with pytest.raises(ModelError) as info:
        load_model(tiny_model_dir("t5", tiny_root, TaskType.SEQ_2_SEQ_LM), TaskType.CAUSAL_LM)
    assert "SEQ_2_SEQ_LM" in info.value.problems[0].fix


def test_remote_code_needed(tmp_path):
    d = tiny_remote_config_dir("chatglm", tmp_path)
    with pytest.raises(ModelError) as info:
        load_model(d, TaskType.CAUSAL_LM)
    (p,) = info.value.problems
    assert p.key == "trust_remote_code" and "trust_remote_code: true" in p.fix
    with pytest.raises(ModelError) as info:
        load_model(d, TaskType.CAUSAL_LM, trust_remote_code=True)
    assert "code could not be loaded" in info.value.problems[0].message


def test_tokenizer_pad_defaults_to_eos_and_eos_is_kept(llama_dir, tmp_path):
    tok = load_tokenizer(llama_dir)
    assert tok.pad_token_id == tok.eos_token_id == 2 and tok.eos_token == "<|im_end|>"
    # A tokenizer saved without a pad token gets eos as pad; eos itself does not change.
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    shutil.copy(llama_dir / "config.json", tmp_path / "config.json")
    reloaded = load_tokenizer(tmp_path)
    assert reloaded.pad_token == reloaded.eos_token == "<|im_end|>"


def test_tokenizer_missing(tmp_path, llama_dir):
    shutil.copy(llama_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelError) as info:
        load_tokenizer(tmp_path)
    assert "tokenizer" in info.value.problems[0].message


# ----------------------------------------------------------------------------------------------- tiny models

def test_tiny_dir_is_idempotent_and_deterministic(tiny_root, tmp_path, llama_dir):
    mtime = (llama_dir / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert tiny_model_dir("llama", tiny_root) == llama_dir
    assert time.perf_counter() - start < 0.5
    assert (llama_dir / "model.safetensors").stat().st_mtime_ns == mtime
    from safetensors.torch import load_file

    other = tiny_model_dir("llama", tmp_path)
    a, b = load_file(llama_dir / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_dir_generates_with_the_smollm2_tokenizer(llama_dir):
    tok = load_tokenizer(llama_dir)
    model = load_model(llama_dir, TaskType.CAUSAL_LM)
    assert model.config.vocab_size == len(tok) == 49152
    assert model.config.eos_token_id == tok.eos_token_id
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_unknown_tiny_family(tmp_path):
    with pytest.raises(ModelError) as info:
        tiny_model_dir("lama", tmp_path)
    assert "llama" in info.value.problems[0].fix
