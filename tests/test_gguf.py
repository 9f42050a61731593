"""GGUF import of the embedded SmolLM2: a plain, serializable HF dir, cached and reused.

The `smollm2_dir` fixture runs `import_gguf` on a machine with an empty cache (CI); a second fresh import here
would cost minutes on 2 shared cores, so these tests check the imported dir and the cache instead.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from loraforge.errors import ModelError
from loraforge.models.gguf import BUILTIN_MODELS, builtin_gguf_path, import_gguf, resolve_model_path


def test_builtin_dir_is_a_plain_hf_model(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert (smollm2_dir / "model.safetensors").is_file()
    assert json.loads((smollm2_dir / "loraforge_import.json").read_text())["format"] == "gguf"


def test_cache_is_reused(smollm2_dir):
    start = time.perf_counter()
    again = resolve_model_path("SmolLM2-135M-Instruct")  # an alias of the built-in name
    assert again == smollm2_dir
    assert time.perf_counter() - start < 1.0
    assert resolve_model_path(smollm2_dir) == smollm2_dir  # a dir resolves to itself


def test_reloads_with_auto_model_unquantized(smollm2_dir, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model.config, "quantization_config", None)
    assert next(model.parameters()).dtype == torch.float32
    ids = smollm2_tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert torch.isfinite(logits).all()
    # A real language model, not random weights: " Paris" is among the top next tokens.
    top = smollm2_tokenizer.convert_ids_to_tokens(logits[0, -1].topk(5).indices.tolist())
    assert "ĠParis" in top, top


def test_unknown_name_suggests_the_builtin():
    with pytest.raises(ModelError) as info:
        resolve_model_path("smolm2")
    (p,) = info.value.problems
    assert p.key == "base_model" and "smollm2" in p.fix


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelError) as info:
        resolve_model_path(tmp_path)
    assert "config.json" in info.value.problems[0].message


def test_import_of_missing_file(tmp_path):
    with pytest.raises(ModelError) as info:
        import_gguf(tmp_path / "x.gguf", tmp_path / "out")
    assert info.value.problems[0].key == "gguf_file"


def test_builtin_file_is_found_without_importing_its_package():
    import sys

    path = builtin_gguf_path(BUILTIN_MODELS[0])
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert BUILTIN_MODELS[0].package not in sys.modules
