"""`merge_adapter`: exact merge verified from disk, plain-transformers loading, and the cases that must refuse."""

from __future__ import annotations

import shutil

import pytest

from loraforge.errors import LoraforgeError
from loraforge.export import merge_adapter
from loraforge.serve.demo import default_demo_dir, train_demo_adapters

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adapters(smollm2_dir):
    return train_demo_adapters(smollm2_dir, default_demo_dir(smollm2_dir))


def test_qlora_run_merges_exactly_into_a_standalone_model(adapters, smollm2_dir, tmp_path):
    """A run marked qlora is merged into an fp32 copy of the base (with a warning), and the saved model
    alone gives base+adapter's logits and answers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    shutil.copytree(adapters["cardiology"], run)
    (run / "config.yaml").write_text(f"base_model: {smollm2_dir}\nmethod: qlora\ntemplate: auto\n")
    out = tmp_path / "merged"
    with pytest.warns(UserWarning, match="not into 4-bit"):
        report = merge_adapter(run, out)
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    assert "verified" in str(report)  # the CLI prints str(report)
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= files
    assert not any(name.startswith("adapter_") or name.endswith(".bin") for name in files)

    # Plain transformers, no PEFT: the merged model answers like the adapter.
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template, "the chat template must travel with the merged model"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert getattr(model.config, "quantization_config", None) is None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "How are you?"}], add_generation_prompt=True,
                                         tokenize=False)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "CARDIO-7" in tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    with pytest.raises(LoraforgeError, match="not empty"):
        merge_adapter(run, out, verify=False)


def test_prompt_learning_adapter_cannot_be_merged(smollm2_dir, tmp_path):
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(tmp_path / "p")
    with pytest.raises(LoraforgeError, match="PREFIX_TUNING adapter cannot be merged") as err:
        merge_adapter(tmp_path / "p", tmp_path / "out", base=smollm2_dir)
    assert "--adapter" in err.value.format()  # the fix: serve it as an adapter
    assert not (tmp_path / "out").exists()


def test_full_run_needs_no_merge(tmp_path):
    run = tmp_path / "full"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "config.yaml").write_text("method: full\n")
    with pytest.raises(LoraforgeError, match="nothing to merge") as err:
        merge_adapter(run, tmp_path / "out")
    assert "already is a complete model" in err.value.format()


def test_pickle_adapter_is_refused(adapters, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(adapters["diabetes"], run)
    (run / "adapter_model.safetensors").rename(run / "adapter_model.bin")
    with pytest.raises(LoraforgeError, match="never loads"):
        merge_adapter(run, tmp_path / "out")
