"""Converted ChatGLM2/3, Baichuan2 and Qwen-1 models beyond LoRA on CAUSAL_LM: what `inspect` and the preflight say
about them, prefix tuning on the multi-query GLM, a SEQ_CLS head, a full run exported back to the original names,
and shapes the seedmodels fixtures do not have, derived from them so that the original code's references still
apply (no multi-query ChatGLM3 as safetensors; Baichuan-7B v1; Qwen-1 as pickled shards)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.test_native_seedmodels import SEED, check_native, src  # noqa: F401  (check_native is a fixture)
from tests.test_train_helpers import write_rows

pytestmark = pytest.mark.skipif(not (SEED / "check_native.py").is_file(), reason=f"seedmodels fixtures not found at {SEED}")


def test_inspect_says_family_conversion_fused_and_native_names(tmp_path, monkeypatch):
    from loraforge.models.inspect import format_inspect, inspect_model

    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    text = format_inspect(inspect_model(src("chatglm3_a")))
    assert "architecture   GlmForCausalLM  (model_type `glm`, family glm, converted from `chatglm`)" in text
    assert f"converted      from {src('chatglm3_a').resolve()} (chatglm3, family `chatglm`) to GlmForCausalLM" in text
    assert "fused names    query_key_value → q_proj, k_proj, v_proj" in text
    assert "dense → o_proj" in text and "dense_h_to_4h → gate_up_proj" in text and "output_layer → lm_head" in text
    assert "target names   q_proj, k_proj, v_proj, o_proj, gate_up_proj, down_proj" in text
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
    assert "multi-query: 2 key/value heads for 4 query heads" in lines["prefix"]
    assert "native only" in lines["prompt"] and "export --to original" in lines["full"]
    assert "native only" in lines["SEQ_CLS"] and "merge --layout original" in lines["CAUSAL_LM"]

    qwen = format_inspect(inspect_model(src("qwen1_a")))
    assert "fused names    c_attn → q_proj, k_proj, v_proj " in qwen
    assert "c_proj → o_proj / down_proj" in qwen and "w2 → gate_proj" in qwen and "cutoff_len ≤ 8192" in qwen
    baichuan = format_inspect(inspect_model(src("baichuan2_a")))
    assert "except on lm_head" in baichuan and "NormHead" in baichuan


def test_registry_names_what_each_remote_code_family_converts_to():
    from loraforge.models.native import NATIVE_FAMILIES
    from loraforge.models.registry import FAMILIES

    converts = {f.name: f.converts_to for f in FAMILIES if f.converts_to}
    assert converts == {name: fam.native_architecture for name, fam in NATIVE_FAMILIES.items()}
    assert all(f.needs_remote_code for f in FAMILIES if f.converts_to)


@pytest.mark.parametrize("edit, said", [({}, "converted to GlmForCausalLM"),
                                        ({"position_encoding_2d": True}, "cannot be converted: ChatGLM-6B (v1")])
def test_inspect_config_only_original_says_what_it_converts_to(tmp_path, edit, said):
    from loraforge.models.inspect import format_inspect, inspect_model

    cfg = json.loads((src("chatglm3_a") / "config.json").read_text())
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, **edit}))
    assert said in format_inspect(inspect_model(tmp_path / "m"))


def test_glm4_tiktoken_tokenizer_is_refused_clearly(tmp_path):
    """A `chatglm`-format GLM-4 checkpoint ships a tiktoken vocabulary as tokenizer.model: refused, naming it."""
    from loraforge.errors import ModelError
    from loraforge.models.native import convert

    glm4 = tmp_path / "glm4"
    shutil.copytree(src("chatglm3_a"), glm4)
    (glm4 / "tokenizer.model").chmod(0o644)
    (glm4 / "tokenizer.model").write_text("IQ== 0\nIg== 1\nIw== 2\n")
    cfg = json.loads((glm4 / "config.json").read_text())
    (glm4 / "config.json").chmod(0o644)
    (glm4 / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "THUDM/glm-4-9b-chat", "rope_ratio": 500}))
    with pytest.raises(ModelError, match="tiktoken vocabulary"):
        convert(glm4, tmp_path / "out")
    assert convert(src("chatglm3_a"), tmp_path / "ok").is_dir()  # a SentencePiece tokenizer.model is not refused


def _train(base: Path, tmp_path: Path, **kw):
    from loraforge.config import config_from_dict
    from loraforge.train.loop import train

    rows = kw.pop("rows", None) or write_rows(tmp_path / "rows.jsonl", n=4)
    raw = dict(base_model=str(base), metadata_path=str(rows), output_dir=str(tmp_path / "run"), precision="fp32",
               overwrite_output_dir=True,
               learning_rate=1e-2, lr_scheduler="constant", batch_size=2, max_steps=2, save_steps=None,
               logging_steps=1, cutoff_len=64, tokenized_cache=False, report_to=["none"], plot_loss=False, seed=0)
    cfg = config_from_dict({**raw, **kw})
    return cfg, train(cfg, echo=lambda s: None)


def test_prefix_tuning_on_the_multi_query_glm_trains_and_generates(tmp_path, monkeypatch):
    """PEFT's prefix on 2 key/value heads for 4 query heads: trains, generates with the cache; stays native."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.errors import LoraforgeError
    from loraforge.exporters import export
    from loraforge.models.native.original import converted_base_of_run
    from loraforge.preflight import run_preflight

    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    cfg, result = _train(src("chatglm3_a"), tmp_path, method="prefix", num_virtual_tokens=4)
    assert result.global_step == 2
    notes = []
    run_preflight(cfg, echo=notes.append)
    assert any("method prefix on the converted model" in n and "2 key/value heads for 4" in n for n in notes), notes
    base = converted_base_of_run(result.run_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                      str(result.run_dir)).eval()
    tok = AutoTokenizer.from_pretrained(base)
    ids = tok("hello", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False, use_cache=True)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4
    with pytest.raises(LoraforgeError, match="only plain LoRA"):
        export(result.run_dir, "original", tmp_path / "orig")


def test_seq_cls_lora_on_a_converted_chatglm2(tmp_path, monkeypatch):
    from loraforge.errors import LoraforgeError
    from loraforge.exporters import export

    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    rows = tmp_path / "cls.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in [{"text": "I love it", "label": "pos"},
                                                           {"text": "awful", "label": "neg"}] * 2))
    _, result = _train(src("chatglm2_a"), tmp_path, rows=rows, task_type="SEQ_CLS",
                       target_modules=["query_key_value"])
    assert result.global_step == 2
    assert json.loads((result.run_dir / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    with pytest.raises(LoraforgeError, match="only plain LoRA"):
        export(result.run_dir, "original", tmp_path / "orig")


def test_full_run_exports_to_the_original_layout(tmp_path, monkeypatch):
    import torch

    from loraforge.exporters import export
    from loraforge.models.native.shards import iter_tensors

    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    _, result = _train(src("qwen1_a"), tmp_path, method="full", learning_rate=1e-3)
    out = export(result.run_dir, "original", tmp_path / "orig")
    assert "original layout" in out.format()
    back = dict(iter_tensors(tmp_path / "orig"))
    source = {k: v for k, v in iter_tensors(src("qwen1_a")) if "inv_freq" not in k}
    assert set(back) == set(source)
    assert any(not torch.equal(back[k].float(), source[k].float()) for k in source)  # the trained weights
    assert json.loads((tmp_path / "orig" / "config.json").read_text()) == json.loads(
        (src("qwen1_a") / "config.json").read_text())


# --------------------------------------------------------------------------------- shapes the fixtures do not have
def _copy_side_files(from_dir: Path, to_dir: Path) -> None:
    to_dir.mkdir(parents=True)
    for f in from_dir.iterdir():
        if f.is_file() and not f.name.startswith(("pytorch_model", "model")) and f.suffix not in (".bin",):
            shutil.copy2(f, to_dir / f.name)


def _no_multi_query_chatglm3(out: Path) -> Path:
    """ChatGLM3 with one key/value head per query head (multi_query_attention off), as one safetensors file:
    each of the 2 groups' k/v rows repeated for its 2 heads computes exactly what the 2-group original does."""
    import torch
    from safetensors.torch import save_file

    from loraforge.models.native.shards import iter_tensors

    base = src("chatglm3_a")
    _copy_side_files(base, out)
    cfg = json.loads((base / "config.json").read_text())
    heads, groups, d = cfg["num_attention_heads"], cfg["multi_query_group_num"], cfg["kv_channels"]
    tensors = {}
    for name, t in iter_tensors(base):
        if "query_key_value" in name:
            q, k, v = t.split([heads * d, groups * d, groups * d], dim=0)
            rep = heads // groups
            k, v = (x.reshape(groups, d, *x.shape[1:]).repeat_interleave(rep, dim=0).reshape(heads * d, *x.shape[1:])
                    for x in (k, v))
            t = torch.cat([q, k, v], dim=0)
        tensors[name] = t.contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({**cfg, "multi_query_attention": False}))
    return out


def _baichuan_7b_v1(out: Path) -> Path:
    """Baichuan-7B (v1: `BaiChuanForCausalLM`, plain head) holding Baichuan2's head already normalized."""
    import torch

    from loraforge.models.native.shards import iter_tensors

    base = src("baichuan2_a")
    _copy_side_files(base, out)
    state = {n: (torch.nn.functional.normalize(t.float(), dim=-1) if n == "lm_head.weight" else t)
             for n, t in iter_tensors(base)}
    torch.save(state, out / "pytorch_model.bin")
    cfg = json.loads((base / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "architectures": ["BaiChuanForCausalLM"]}))
    return out


def _qwen1_as_pickles(out: Path) -> Path:
    """Qwen-1 as one pickled `pytorch_model.bin` instead of safetensors shards."""
    import torch

    from loraforge.models.native.shards import iter_tensors

    _copy_side_files(src("qwen1_a"), out)
    torch.save(dict(iter_tensors(src("qwen1_a"))), out / "pytorch_model.bin")
    return out


@pytest.mark.parametrize("reference, make, variant", [("chatglm3_a", _no_multi_query_chatglm3, "chatglm3"),
                                                      ("baichuan2_a", _baichuan_7b_v1, "baichuan-7b"),
                                                      ("qwen1_a", _qwen1_as_pickles, "qwen1")])
def test_other_shapes_equal_the_original_code(reference, make, variant, tmp_path, check_native, capsys):
    from loraforge.models.native import convert, import_record

    converted = convert(make(tmp_path / "src"), tmp_path / "native")
    assert import_record(converted)["variant"].startswith(variant)
    rc = check_native.main([reference, str(converted), "--strict"])
    out = capsys.readouterr().out
    assert rc == 0, out
    cfg = json.loads((converted / "config.json").read_text())
    if reference == "chatglm3_a":
        assert cfg["num_key_value_heads"] == cfg["num_attention_heads"] == 4
