"""`export --to gguf` across families: the seed's converted checkpoints in llama.cpp, and every registry family.

* Baichuan2 and Qwen-1 checkpoints (../shared/fixtures/seedmodels, built with each family's own code) are
  converted to `llama` / `qwen2` and exported; llama.cpp (`llama-cpp-python`, scripts/llama_cpp.sh) must give
  the original code's greedy tokens and logits, tokenize the reference strings as transformers does, and turn
  the chat template stored in the file into the family's own prompt ids. A converted ChatGLM (`glm`) is
  refused by name with the llama.cpp-converter route.
* Every family in `loraforge.models.registry.FAMILIES` is either written (and run by llama.cpp, or read back by
  transformers' GGUF loader, with the original logits) or refused with a LoraforgeError naming it — never
  another exception. Gemma / Gemma 2 (norm weights + 1) run in llama.cpp like transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from loraforge.errors import LoraforgeError
from loraforge.exporters import export

SEED = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "seedmodels"
needs_seed = pytest.mark.skipif(not (SEED / "README.md").is_file(),
                                reason=f"seedmodels fixtures not found at {SEED} (../shared/fixtures/seedmodels)")
# fixture → (folder, llama.cpp architecture of its conversion)
WRITTEN = {"baichuan2_a": ("baichuan2", "llama"), "qwen1_a": ("qwen1", "qwen2")}
# Vocabulary tokens llama.cpp re-types as control tokens by their text at load (it logs "control-looking
# token"): Qwen's byte-level vocabulary has a plain "</s>" token, which llama.cpp's end-of-generation list knows.
LLAMA_CPP_RETYPES = {"qwen1_a": ("</s>", 128247)}


def _llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama.cpp consumer absent: run scripts/llama_cpp.sh "
                                                   "(builds llama-cpp-python once, ~8 min on 2 cores, then cached)")


def _reference(name: str, folder: str) -> tuple[dict, dict]:
    from safetensors.numpy import load_file

    ref_dir = SEED / folder / f"{name}_ref"
    ref = json.loads((ref_dir / "reference.json").read_text(encoding="utf-8"))
    return ref, load_file(str(ref_dir / ref["logits"]["file"]))


@pytest.fixture(scope="module")
def seed_ggufs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """fixture name → (converted HF dir, its f32 GGUF)."""
    from loraforge.models.native import convert

    root = tmp_path_factory.mktemp("seed-gguf")
    out = {}
    for name, (folder, _) in WRITTEN.items():
        converted = convert(SEED / folder / name, root / name)
        result = export(converted, "gguf", root / f"{name}-gguf", quant="f32", progress=False)
        out[name] = (converted, result.files[0])
    return out


@pytest.fixture(scope="module")
def llama_models(seed_ggufs):
    llama_cpp = _llama_cpp()
    # an f32 KV cache: llama.cpp's default f16 cache alone moves these logits by ~4e-3
    models = {name: llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=1,
                                    type_k=0, type_v=0) for name, (_, path) in seed_ggufs.items()}
    yield models
    for llm in models.values():
        llm.close()


def _greedy(llm, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """llama.cpp's greedy continuation (argmax, KV cache) and its logits over the prompt."""
    llm.reset()
    llm.eval(prompt)
    prompt_logits = np.array(llm.scores[: len(prompt)])
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out, prompt_logits


@needs_seed
@pytest.mark.parametrize("name", list(WRITTEN))
def test_converted_checkpoint_runs_in_llama_cpp_like_the_original_code(name, seed_ggufs, llama_models):
    folder, arch = WRITTEN[name]
    ref, logits = _reference(name, folder)
    assert llama_models[name].metadata["general.architecture"] == arch
    gen = ref["generation"]
    tokens, prompt_logits = _greedy(llama_models[name], gen["prompt_ids"], len(gen["new_token_ids"]))
    assert tokens == gen["new_token_ids"]  # the family's own generate(), greedy
    plain = ref["logits"]["batches"]["plain"]
    assert plain["input_ids"][0] == gen["prompt_ids"]
    cols = logits["plain.columns"].astype(int)
    diff = np.abs(prompt_logits[:, cols] - logits["plain.cols_logits"][0]).max()
    assert diff <= ref["tolerance"]["logits_max_abs"], diff  # 1e-4, as for the HF conversion itself
    clear = logits["plain.top2_gap"][0] > 1e-2
    assert (prompt_logits.argmax(-1)[clear] == logits["plain.argmax"][0][clear]).all()


@needs_seed
@pytest.mark.parametrize("name", list(WRITTEN))
def test_llama_cpp_tokenizes_and_formats_chat_like_transformers(name, seed_ggufs, llama_models):
    """Every reference string (Chinese, spaces, tabs, newlines, emoji, typed special tokens…) gets the same ids
    from llama.cpp as from transformers and the original tokenizer; the chat template in the GGUF, rendered by
    llama-cpp-python's own Jinja formatter and tokenized by llama.cpp, gives the family's chat prompt ids."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoTokenizer

    ref, _ = _reference(name, WRITTEN[name][0])
    llm = llama_models[name]
    tokenizer = AutoTokenizer.from_pretrained(seed_ggufs[name][0])
    cases = ref["tokenization"]["cases"]
    assert len(cases) >= 17
    for case in cases:
        text = case["text"].encode("utf-8")
        assert tokenizer.encode(case["text"], add_special_tokens=False) == case["ids_no_special"]
        retyped = LLAMA_CPP_RETYPES.get(name)
        if retyped and retyped[0] in case["text"]:
            # llama.cpp itself makes this vocabulary token a control token (by its text), so typed text
            # parses to it; the file types it NORMAL, as transformers and the original tokenizer treat it
            control = llm._model.token_get_attr(retyped[1]) & 8  # LLAMA_TOKEN_ATTR_CONTROL
            assert control and retyped[1] in llm.tokenize(text, add_bos=False, special=True)
            continue
        assert llm.tokenize(text, add_bos=False, special=True) == case["ids_no_special"], case["text"]
        assert llm.tokenize(text, add_bos=True, special=True) == case["ids_default"], case["text"]
    template = llm.metadata["tokenizer.chat_template"]
    assert template == tokenizer.chat_template
    for chat in ref["chat"]:
        if chat.get("informational"):
            continue  # typed special-token text: the original keeps it as text only in its own prompt builder
        prompt = Jinja2ChatFormatter(template, eos_token="", bos_token="")(messages=chat["messages"]).prompt
        assert llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) == chat["ids"], chat["name"]


@needs_seed
def test_sentencepiece_vocab_metadata_matches_what_the_tokenizer_does(seed_ggufs):
    """Baichuan2's SentencePiece model has no dummy prefix: llama.cpp (which adds one unless told) must be told.
    Scores order the merges; user-defined pieces (the chat role tokens 195/196) and byte pieces are typed."""
    import gguf
    from transformers import AutoTokenizer

    converted, path = seed_ggufs["baichuan2_a"]
    reader = gguf.GGUFReader(str(path))
    field = reader.fields
    assert field["tokenizer.ggml.model"].contents() == "llama"
    assert field["tokenizer.ggml.add_space_prefix"].contents() is False
    assert field["tokenizer.ggml.add_bos_token"].contents() is False
    tokens = field["tokenizer.ggml.tokens"].contents()
    types = field["tokenizer.ggml.token_type"].contents()
    scores = np.array(field["tokenizer.ggml.scores"].contents())
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert tokens == tokenizer.convert_ids_to_tokens(list(range(len(tokens))))
    kind = gguf.TokenType
    assert [types[i] for i in (0, 1, 2, 195, 196)] == [kind.UNKNOWN, kind.CONTROL, kind.CONTROL,
                                                       kind.USER_DEFINED, kind.USER_DEFINED]
    assert types[tokens.index("<0x0A>")] == kind.BYTE
    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    first, second = ("".join(m) if isinstance(m, list) else m.replace(" ", "") for m in spec["merges"][:2])
    assert scores[tokens.index(first)] > scores[tokens.index(second)] > scores.min()


@needs_seed
def test_converted_chatglm_is_refused_by_name(tmp_path, monkeypatch):
    """ChatGLM converts to transformers' `glm`, which this writer does not lay out: refused before any file is
    written, with the exact commands of the llama.cpp-converter route — for the converted folder, and for the
    original checkpoint (converted on the way, into the cache)."""
    from loraforge.models.native import convert

    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    original = SEED / "chatglm3" / "chatglm3_a"
    for model_dir in (convert(original, tmp_path / "chatglm3-native"), original):
        out = tmp_path / f"out-{model_dir.name}"
        with pytest.raises(LoraforgeError, match="llama.cpp runs 'glm' models") as err:
            export(model_dir, "gguf", out, progress=False)
        fix = err.value.problems[0].fix
        assert f"loraforge export {model_dir} --to hf --out {out}-hf" in fix
        assert f"mkdir -p {out} && python convert_hf_to_gguf.py {out}-hf --outfile " \
               f"{out / (model_dir.name + '-f16.gguf')} --outtype f16" in fix
        assert not out.exists()


# ------------------------------------------------------------------------------------- every registry family

def _config_dir(model_type: str, family, root: Path) -> Path:
    """A folder with only config.json for `model_type` (what the writer decides on, before any weight)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from loraforge.models.tiny import TINY_REMOTE_FAMILIES, tiny_remote_config_dir

    if model_type in TINY_REMOTE_FAMILIES:
        return tiny_remote_config_dir(model_type, root)
    out = root / f"{model_type}-config"
    out.mkdir(parents=True, exist_ok=True)
    if model_type in CONFIG_MAPPING_NAMES:
        from transformers import AutoConfig

        AutoConfig.for_model(model_type).save_pretrained(out)
    else:  # a remote-code model type transformers does not know
        cfg = {"model_type": model_type, "architectures": list(family.architectures)}
        (out / "config.json").write_text(json.dumps(cfg))
    return out


def _read_back_logits(model_dir: Path, gguf_file: Path, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(the HF model's logits, the GGUF's) — the GGUF run by llama.cpp (f32 KV cache), or by transformers' GGUF
    loader when llama.cpp is absent (that loader has no `gemma` and ignores Qwen3's key_length and Gemma 2's
    soft-capping / query scale, so those need llama.cpp)."""
    import transformers

    with torch.no_grad():
        want = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()(torch.tensor([ids])).logits[0]
    try:
        import llama_cpp
    except ImportError:
        model_type = json.loads((model_dir / "config.json").read_text())["model_type"]
        if model_type in ("qwen3", "gemma", "gemma2"):  # head_dim, soft-capping and query scale are not read
            pytest.skip(f"llama.cpp absent (scripts/llama_cpp.sh): transformers' GGUF loader misreads {model_type}")
        with torch.no_grad():
            got = transformers.AutoModelForCausalLM.from_pretrained(
                gguf_file.parent, gguf_file=gguf_file.name).eval()(torch.tensor([ids])).logits[0]
        return want.numpy(), got.numpy()
    llm = llama_cpp.Llama(str(gguf_file), n_ctx=32, logits_all=True, verbose=False, n_threads=1, type_k=0, type_v=0)
    try:
        llm.eval(ids)
        return want.numpy(), np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


def test_every_registry_family_is_written_or_refused_by_name(tmp_path):
    from loraforge.exporters.gguf_model import ARCHS
    from loraforge.models.registry import FAMILIES
    from loraforge.models.tiny import tiny_model_dir

    written, refused = [], []
    for family in FAMILIES:
        for model_type in family.model_types:
            out = tmp_path / f"gguf-{model_type}"
            # a layout the writer has: a real tiny model; any other: config.json alone (refused before weights)
            model_dir = tiny_model_dir(model_type, tmp_path / "tiny") if model_type in ARCHS else \
                _config_dir(model_type, family, tmp_path / "configs")
            try:
                result = export(model_dir, "gguf", out, quant="f32", progress=False)
            except LoraforgeError as err:  # anything else (a crash) fails the test
                text = err.format()
                assert model_type in text and family.name in text, text
                assert not out.exists()
                refused.append(model_type)
                continue
            want, got = _read_back_logits(model_dir, result.files[0], [1, 100, 200, 300, 2, 17])
            assert np.abs(got - want).max() <= 1e-3, model_type
            written.append(model_type)
    assert sorted(written) == ["gemma", "llama", "mistral", "qwen2", "qwen3"]
    # tiny Gemma 2 scales queries by 1/sqrt(256) with head_dim 8, which llama.cpp's graph cannot express
    assert {"gemma2", "gemma3", "glm", "chatglm", "baichuan", "qwen", "mixtral", "t5", "bert"} <= set(refused)


# ---------------------------------------------------------------------------------------------------- Gemma

def _gemma_dir(family: str, root: Path, **overrides) -> Path:
    """A tiny Gemma / Gemma 2 with the SmolLM2 tokenizer and random norm weights (so the +1 offset matters)."""
    import transformers

    from loraforge.models.gguf import resolve_model_path
    from loraforge.models.tiny import tiny_config

    tok = transformers.AutoTokenizer.from_pretrained(resolve_model_path("smollm2"))
    cfg = tiny_config(family, len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id, **overrides)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    out = root / family
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("family,overrides,tol", [("gemma", {}, 1e-4),
                                                  # llama.cpp's GELU is tabulated in fp16 on CPU
                                                  ("gemma2", {"query_pre_attn_scalar": 8}, 1e-3)])
def test_gemma_runs_in_llama_cpp_like_transformers(tmp_path, family, overrides, tol):
    import gguf

    model_dir = _gemma_dir(family, tmp_path, **overrides)
    path = export(model_dir, "gguf", tmp_path / "out", quant="f32", progress=False).files[0]
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == family
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    from safetensors.torch import load_file

    hf = load_file(str(model_dir / "model.safetensors"))
    assert np.allclose(tensors["blk.1.attn_norm.weight"], hf["model.layers.1.input_layernorm.weight"].numpy() + 1)
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    if family == "gemma2":
        assert reader.fields["gemma2.final_logit_softcapping"].contents() == 30.0
    _llama_cpp()
    want, got = _read_back_logits(model_dir, path, [1, 100, 200, 300, 400, 2, 17, 9000])
    assert np.abs(got - want).max() <= tol
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_gemma2_that_llama_cpp_cannot_express_is_refused(tmp_path):
    model_dir = _gemma_dir("gemma2", tmp_path, attn_logit_softcapping=None)  # and query_pre_attn_scalar 256
    with pytest.raises(LoraforgeError, match="gemma2 model to GGUF") as err:
        export(model_dir, "gguf", tmp_path / "out", progress=False)
    assert [p.key for p in err.value.problems] == ["attn_logit_softcapping", "query_pre_attn_scalar"]
    assert not (tmp_path / "out").exists()
