"""Old remote-code checkpoints converted to native transformers models, checked against references made with
each family's own code (../shared/fixtures/seedmodels: ChatGLM3, ChatGLM2, Baichuan2-7B, Qwen-1).

Every fixture converts, passes the fixtures' own `check_native.py --strict` (fp32 logits ≤ 1e-4, token ids,
chat prompt ids, greedy generation), trains LoRA steps named in the original module names, and its adapter
goes back to the original layout with the fused update equal to the stacked native one.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from tests.test_train_helpers import make_cfg, write_rows

SEED = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "seedmodels"
pytestmark = pytest.mark.skipif(not (SEED / "check_native.py").is_file(),
                                reason=f"seedmodels fixtures not found at {SEED} (../shared/fixtures/seedmodels)")

FIXTURES = {"chatglm3_a": "chatglm3/chatglm3_a", "chatglm2_a": "chatglm2/chatglm2_a",
            "baichuan2_a": "baichuan2/baichuan2_a", "qwen1_a": "qwen1/qwen1_a"}
# target_modules in each checkpoint's own names, and what they become natively
ORIGINAL_TARGETS = {"chatglm3_a": (["query_key_value", "dense_4h_to_h"], ["q_proj", "k_proj", "v_proj", "down_proj"]),
                    "chatglm2_a": (["query_key_value", "dense_h_to_4h"], ["q_proj", "k_proj", "v_proj", "gate_up_proj"]),
                    "baichuan2_a": (["W_pack", "o_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"]),
                    "qwen1_a": (["c_attn", "w2"], ["q_proj", "k_proj", "v_proj", "gate_proj"])}


def src(name: str) -> Path:
    return SEED / FIXTURES[name]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    from loraforge.models.native import convert

    root = tmp_path_factory.mktemp("native")
    return {name: convert(src(name), root / name) for name in FIXTURES}


@pytest.fixture(scope="module")
def check_native():
    spec = importlib.util.spec_from_file_location("seed_check_native", SEED / "check_native.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", list(FIXTURES))
def test_conversion_equals_the_original_code(name, converted, check_native, capsys):
    rc = check_native.main([name, str(converted[name]), "--strict"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"seedmodels {name} logits=OK" in out and "chat=OK" in out and "generation OK" in out
    cfg = json.loads((converted[name] / "config.json").read_text())
    assert "auto_map" not in cfg and cfg["loraforge_converted_from"] in ("chatglm", "baichuan", "qwen")


def test_baichuan2_normhead_is_stored_normalized(converted):
    import torch
    from safetensors.torch import load_file

    head = load_file(str(converted["baichuan2_a"] / "model.safetensors"))["lm_head.weight"]
    norms = head.float().norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
    raw = torch.load(src("baichuan2_a") / "pytorch_model.bin", weights_only=True)["lm_head.weight"].float()
    assert float(raw.norm(dim=-1).max()) < 0.5  # the checkpoint stores it raw: the normalization is ours


def test_typed_role_strings_stay_text_like_the_original(converted):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted["chatglm3_a"])
    ids = tok.encode("<|user|>[gMASK]", add_special_tokens=False)
    assert 1006 not in ids and 1001 not in ids
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    assert prompt[:3] == [1001, 1003, 1006] and prompt[-1] == 1007


def _write(tmp: Path, cfg: dict) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(cfg))
    return tmp


@pytest.mark.parametrize("kind, edit, message", [
    ("chatglm2_a", {"position_encoding_2d": True, "inner_hidden_size": 16384}, "ChatGLM-6B (v1"),
    ("baichuan2_a", {"max_position_embeddings": None, "hidden_size": 5120, "num_hidden_layers": 40}, "ALiBi"),
    ("qwen1_a", {"rotary_pct": 0.5}, "rotary_pct"),
])
def test_shapes_without_a_native_equivalent_are_refused(tmp_path, kind, edit, message):
    from loraforge.errors import ModelError
    from loraforge.models.native import convert

    cfg = json.loads((src(kind) / "config.json").read_text())
    cfg.update(edit)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    with pytest.raises(ModelError, match=message.replace("(", r"\(")):
        convert(_write(tmp_path / "src", cfg), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sharded_output_and_source_streaming(converted, tmp_path):
    """Small shards: the index maps every tensor, and the tensors equal the single-file conversion."""
    from safetensors.torch import load_file

    from loraforge.models.native import convert
    from loraforge.models.native.shards import iter_tensors

    out = convert(src("chatglm3_a"), tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    one = load_file(str(converted["chatglm3_a"] / "model.safetensors"))
    many = dict(iter_tensors(out))
    assert set(many) == set(one) and all(bool((many[k] == one[k]).all()) for k in one)


def test_pickled_shards_are_read_weights_only(tmp_path):
    """A `.bin` holding an arbitrary object is refused by the unpickler, never executed or loaded."""
    import pickle

    import torch

    from loraforge.models.native import convert

    bad = tmp_path / "bad"
    shutil.copytree(src("chatglm3_a"), bad, ignore=shutil.ignore_patterns("*.bin", "*.index.json"))
    torch.save({"transformer.output_layer.weight": torch.zeros(2), "payload": Path("x")}, bad / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only"):
        convert(bad, tmp_path / "out")


def test_base_model_dir_converts_once_into_the_cache(tmp_path, monkeypatch):
    from loraforge.models.gguf import resolve_model_path
    from loraforge.models.native import import_record

    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    first = resolve_model_path(src("baichuan2_a"))
    stamp = (first / "loraforge_import.json").stat().st_mtime_ns
    again = resolve_model_path(str(src("baichuan2_a")))
    assert again == first and (again / "loraforge_import.json").stat().st_mtime_ns == stamp
    rec = import_record(first)
    assert rec["source"] == str(src("baichuan2_a").resolve()) and rec["variant"] == "baichuan2-7b"
    assert rec["source_weight_files"] == ["pytorch_model.bin"]


def test_original_target_names_are_translated_with_suggestions(converted):
    from loraforge.config import TaskType
    from loraforge.models.discovery import check_target_modules, load_hf_config, try_meta_model
    from loraforge.models.native import translate_targets

    hf = load_hf_config(converted["chatglm3_a"])
    targets, notes = translate_targets(hf, ["query_key_value", "dense_h_to_4h"])
    assert targets == ["q_proj", "k_proj", "v_proj", "gate_up_proj"]
    assert any("query_key_value" in n and "GlmForCausalLM" in n for n in notes)
    meta = try_meta_model(hf, TaskType.CAUSAL_LM)
    assert check_target_modules(hf, meta, ["query_key_value", "dense_h_to_4h"]) == []
    problems = check_target_modules(hf, meta, ["query_proj", "value_proj"])
    text = " ".join(p.format() if hasattr(p, "format") else str(p) for p in problems)
    assert "q_proj" in text and "query_key_value" in text, text


def test_qwen1_cutoff_beyond_seq_length_is_refused(tmp_path, monkeypatch):
    from loraforge.errors import LoraforgeError
    from loraforge.preflight import run_preflight

    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    data = write_rows(tmp_path / "rows.jsonl", n=4)
    with pytest.raises(LoraforgeError, match="seq_length"):
        run_preflight(make_cfg(src("qwen1_a"), data, tmp_path / "run", cutoff_len=9000), echo=lambda s: None)


@pytest.mark.parametrize("name", list(FIXTURES))
def test_lora_on_original_names_trains_and_exports_back_exactly(name, tmp_path, monkeypatch):
    import torch
    from peft import PeftConfig, PeftModel
    from safetensors.torch import load_file

    from loraforge.errors import LoraforgeError
    from loraforge.exporters import export
    from loraforge.models.native.original import converted_base_of_run
    from loraforge.train.loop import train

    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    original_names, native_names = ORIGINAL_TARGETS[name]
    data = write_rows(tmp_path / "rows.jsonl", n=8)
    cfg = make_cfg(src(name), data, tmp_path / "run", max_steps=3, target_modules=original_names, lora_rank=4,
                   lora_alpha=8, batch_size=4)
    result = train(cfg, echo=lambda s: None)
    assert result.global_step == 3
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["conversion"]["source"] == str(src(name).resolve())
    native = load_file(str(result.run_dir / "adapter_model.safetensors"))
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in native} == set(native_names)
    assert max(float(v.abs().max()) for k, v in native.items() if "lora_B" in k) > 0  # it trained

    converted = converted_base_of_run(result.run_dir)
    if name == "chatglm3_a":  # the command line, as users type it
        from typer.testing import CliRunner

        from loraforge.cli import app

        run = CliRunner().invoke(app, ["export", str(result.run_dir), "--to", "original", "--out", str(tmp_path / "orig")])
        assert run.exit_code == 0, run.output
        assert "query_key_value (rank 12)" in run.output and "PeftModel.from_pretrained" in run.output
    else:
        export(result.run_dir, "original", tmp_path / "orig")
    record = json.loads((tmp_path / "orig" / "loraforge_export.json").read_text())
    assert record["layout"] == "original" and record["max_delta_diff"] < 1e-6, record
    fused_leaf = original_names[0]
    # q, k, v LoRAs of rank 4 → one of rank 12
    assert json.loads((tmp_path / "orig" / "adapter_config.json").read_text())["rank_pattern"] == {
        f"{orig}": 12 for orig in _fused_modules(src(name), fused_leaf)}
    with pytest.raises(LoraforgeError, match="not empty"):  # an export never overwrites silently
        export(result.run_dir, "original", tmp_path / "orig")

    # PEFT loads it on a module tree with the original names and shapes: its update is the native one stacked.
    skeleton = _skeleton(src(name), original_names)
    base = {k: v.clone() for k, v in skeleton.state_dict().items()}
    peft_cfg = PeftConfig.from_pretrained(str(tmp_path / "orig"))
    assert peft_cfg.task_type == "CAUSAL_LM" and peft_cfg.rank_pattern
    peft_cfg.task_type = None  # the skeleton is a bare module tree, not a generating model
    merged = PeftModel.from_pretrained(skeleton, str(tmp_path / "orig"), config=peft_cfg).merge_and_unload()
    native_model = _native_deltas(converted, result.run_dir)
    for key, weight in merged.state_dict().items():
        delta = weight - base[key]
        assert torch.allclose(delta, native_model[key], atol=1e-6), key


def _fused_modules(checkpoint: Path, leaf: str) -> list[str]:
    """Module paths of the original checkpoint whose leaf name is `leaf`."""
    from loraforge.models.native.shards import iter_tensors

    return sorted({n.rsplit(".", 1)[0] for n, _ in iter_tensors(checkpoint) if n.rsplit(".", 1)[0].endswith("." + leaf)})


def _skeleton(checkpoint: Path, leaves: list[str]):
    """nn.Linear modules at the original checkpoint's paths for `leaves` (shapes from its weights)."""
    import torch
    from torch import nn

    from loraforge.models.native.shards import iter_tensors

    root = nn.Module()
    for name, t in iter_tensors(checkpoint):
        module, _, param = name.rpartition(".")
        if param != "weight" or module.rsplit(".", 1)[-1] not in leaves or t.dim() != 2:
            continue
        parent = root
        for part in module.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(module.rsplit(".", 1)[-1], nn.Linear(t.shape[1], t.shape[0], bias=False, dtype=torch.float32))
    root.config = type("Cfg", (), {"model_type": "original", "to_dict": lambda self: {}, "get": lambda *a: None})()
    return root


def _native_deltas(converted: Path, run_dir: Path) -> dict:
    """ΔW of the native adapter, stacked back into the original fused weights (zeros for unadapted parts)."""
    import torch
    from safetensors.torch import load_file

    from loraforge.models.native import NATIVE_FAMILIES, import_record
    from loraforge.models.native.base import to_original_module

    fam = NATIVE_FAMILIES[import_record(converted)["family"]]
    cfg = json.loads((run_dir / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    sizes = fam.part_sizes(json.loads((converted / "config.json").read_text()))
    w = load_file(str(run_dir / "adapter_model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for key in w:
        if ".lora_A." not in key:
            continue
        module = key[len("base_model.model."):].split(".lora_A.")[0]
        d = w[key.replace("lora_A", "lora_B")] @ w[key] * scale
        orig, part, parts = to_original_module(fam, module)
        if parts == 1:
            out[f"{orig}.weight"] = d
            continue
        full = out.setdefault(f"{orig}.weight", torch.zeros(sum(sizes), d.shape[1]))
        full[sum(sizes[:part]):sum(sizes[:part + 1])] = d
    return out


@pytest.mark.parametrize("name", ["chatglm3_a", "qwen1_a"])
def test_original_layout_checkpoint_round_trips(name, converted, tmp_path):
    """Writing the converted model back in the original names gives the checkpoint's own tensors, bit for bit."""
    from loraforge.models.native.original import to_original_checkpoint
    from loraforge.models.native.shards import iter_tensors

    out = to_original_checkpoint(converted[name], converted[name], tmp_path / "orig")
    back = dict(iter_tensors(out))
    source = {k: v for k, v in iter_tensors(src(name)) if "inv_freq" not in k}
    assert set(back) == set(source)
    assert all(bool((back[k] == source[k]).all()) for k in source)
    assert json.loads((out / "config.json").read_text()) == json.loads((src(name) / "config.json").read_text())
