"""`loraforge export --to gguf|ollama|gguf-lora|vllm` on tiny random models (seconds).

Every GGUF is read back by implementations independent of our writer: transformers' own GGUF loader and
llama.cpp itself (`llama-cpp-python`, installed by scripts/llama_cpp.sh; tests that need it skip only when it
is absent). The Ollama TEMPLATE is rendered by Go's text/template (`go`, skipped when absent).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from loraforge.errors import LoraforgeError
from loraforge.exporters import EXPORTERS, export
from loraforge.exporters.chat_format import CHECK_CONVERSATIONS, decompose, go_template, jinja_template, run_render
from loraforge.exporters.vllm import max_lora_rank, vllm_problems

IDS = [1, 100, 200, 300, 400, 2, 17, 9000]


def _llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama.cpp consumer absent: run scripts/llama_cpp.sh "
                                                   "(builds llama-cpp-python once, ~8 min on 2 cores, then cached)")


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


def _tiny(family: str, root: Path) -> Path:
    from loraforge.models.tiny import tiny_model_dir

    return tiny_model_dir(family, root)


def _hf_logits(model_dir: Path, **kwargs) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].numpy()


def _llama_cpp_logits(gguf_file: Path, lora: Path | None = None) -> np.ndarray:
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(str(gguf_file), n_ctx=64, logits_all=True, verbose=False, n_threads=1,
                          lora_path=str(lora) if lora else None)
    try:
        llm.eval(IDS)
        return np.array(llm.scores[: len(IDS)])
    finally:
        llm.close()


def _gguf(out: Path) -> Path:
    (path,) = out.glob("*.gguf")
    return path


@pytest.mark.parametrize("family,quant,tol", [("llama", "f32", 1e-4), ("qwen2", "f16", 2e-3), ("mistral", "q8_0", 2e-2)])
def test_gguf_reads_back_with_transformers_loader(tiny_root, tmp_path, family, quant, tol):
    """A complete model (as a full run saves it) → GGUF; transformers' own GGUF loader (which undoes the
    q/k row permutation itself) gives the original logits."""
    import gguf

    model_dir = _tiny(family, tiny_root)
    result = export(model_dir, "gguf", tmp_path / "out", quant=quant, progress=False)
    path = _gguf(tmp_path / "out")
    assert result.files == [path] and "llama-cli" in result.format()
    reader = gguf.GGUFReader(str(path))
    arch = "llama" if family == "mistral" else family
    assert reader.fields["general.architecture"].contents() == arch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert reader.fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == 49152
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.ffn_up.weight"] == quant.upper()
    got = _hf_logits(tmp_path / "out", gguf_file=path.name)
    diff = np.abs(got - _hf_logits(model_dir)).max()
    assert diff <= tol, diff


@pytest.mark.parametrize("family,quant,tol", [("llama", "f32", 1e-3), ("qwen2", "f16", 3e-3),
                                               ("mistral", "q8_0", 3e-2), ("qwen3", "bf16", 3e-2)])
def test_llama_cpp_runs_the_exported_gguf(tiny_root, tmp_path, family, quant, tol):
    """llama.cpp, the real consumer, loads each family's GGUF and computes the same logits as transformers."""
    _llama_cpp()
    model_dir = _tiny(family, tiny_root)
    export(model_dir, "gguf", tmp_path / "out", quant=quant, progress=False)
    diff = np.abs(_llama_cpp_logits(_gguf(tmp_path / "out")) - _hf_logits(model_dir)).max()
    assert diff <= tol, diff


def _lora_run(base: Path, out: Path, **lora_kwargs) -> Path:
    """A LoRA run dir with non-zero B (a fresh PEFT adapter would be a no-op), as loraforge saves one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM", **lora_kwargs)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(out)
    (out / "config.yaml").write_text(f"base_model: {base}\nmethod: lora\ntemplate: auto\n")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(out.parent / f"{out.name}-merged")
    return out


@pytest.mark.parametrize("lora_kwargs", [{}, {"rank_pattern": {"o_proj": 2}, "alpha_pattern": {"v_proj": 3}},
                                         {"use_rslora": True}])
def test_gguf_lora_equals_the_adapter_and_applies_in_llama_cpp(tiny_root, tmp_path, lora_kwargs):
    import gguf
    from safetensors.torch import load_file

    base = _tiny("llama", tiny_root)
    run = _lora_run(base, tmp_path / "run", **lora_kwargs)
    export(base, "gguf", tmp_path / "base", quant="f32", progress=False)
    base_gguf = _gguf(tmp_path / "base")
    result = export(run, "gguf-lora", tmp_path / "lora", base_gguf=str(base_gguf), progress=False)
    assert "--lora" in result.format() and "ADAPTER" in result.format()
    reader = gguf.GGUFReader(str(_gguf(tmp_path / "lora")))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.base_model"].contents() == str(base_gguf)
    alpha = reader.fields["adapter.lora.alpha"].contents()
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    adapter = load_file(str(run / "adapter_model.safetensors"))
    a = adapter["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].numpy()
    b = adapter["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].numpy()
    assert np.array_equal(tensors["blk.1.ffn_down.weight.lora_a"], a)
    if not lora_kwargs:  # one alpha / r for all: tensors are the adapter's, alpha recorded
        assert alpha == 8 and np.array_equal(tensors["blk.1.ffn_down.weight.lora_b"], b)
    else:  # per-module scale folded into B, alpha 0 (= scale 1 in llama.cpp)
        scale = 8 / (4 ** 0.5 if lora_kwargs.get("use_rslora") else 4)
        assert alpha == 0 and np.allclose(tensors["blk.1.ffn_down.weight.lora_b"], b * scale)
    assert len(tensors) == 2 * 5 * 2  # 5 modules × 2 layers × (A, B)
    _llama_cpp()  # the file's contents are checked above even without llama.cpp
    merged = _hf_logits(tmp_path / "run-merged")
    with_lora = _llama_cpp_logits(base_gguf, lora=_gguf(tmp_path / "lora"))
    assert np.abs(with_lora - merged).max() <= 1e-3
    assert np.abs(_llama_cpp_logits(base_gguf) - merged).max() > 1e-2  # the adapter does change the answer


def test_merged_lora_gguf_matches_the_merged_model(tiny_root, tmp_path):
    base = _tiny("qwen2", tiny_root)
    run = _lora_run(base, tmp_path / "run")
    export(run, "gguf", tmp_path / "out", quant="f32", progress=False)
    path = _gguf(tmp_path / "out")
    assert path.name == "run-f32.gguf"
    merged = _hf_logits(tmp_path / "run-merged")
    assert np.abs(_hf_logits(tmp_path / "out", gguf_file=path.name) - merged).max() <= 1e-4


def test_refusals_name_the_problem(tiny_root, tmp_path):
    model_dir = _tiny("llama", tiny_root)
    with pytest.raises(LoraforgeError, match="did you mean `q8_0`"):
        export(model_dir, "gguf", tmp_path / "b", quant="q8_O")
    with pytest.raises(LoraforgeError, match="did you mean `gguf`"):
        export(model_dir, "guff", tmp_path / "c")
    with pytest.raises(LoraforgeError, match="llama.cpp runs 'phi3' models") as err:
        export(_tiny("phi3", tiny_root), "gguf", tmp_path / "d", name="g")
    assert f"--to hf --out {tmp_path / 'd'}-hf --name g && mkdir -p {tmp_path / 'd'} && python convert_hf_to_gguf.py {tmp_path / 'd'}-hf " \
           f"--outfile {tmp_path / 'd' / 'g-f16.gguf'} --outtype f16" in err.value.format()
    from loraforge.exporters.gguf_model import arch_for

    with pytest.raises(LoraforgeError, match="llama.cpp has no architecture for 'opt'"):
        arch_for("opt")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "keep.txt").write_text("x")
    with pytest.raises(LoraforgeError, match="not empty"):
        export(model_dir, "gguf", tmp_path / "e")
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_quantize_commands_name_the_real_files(tiny_root, tmp_path):
    """A k-quant refusal prints the two commands that make it, with the real paths: the f16 export (run here
    through the CLI, as the user would paste it) writes exactly the file its llama-quantize line reads."""
    import shlex

    from typer.testing import CliRunner

    from loraforge.cli import app

    model_dir = _tiny("llama", tiny_root)
    out = tmp_path / "my out"
    with pytest.raises(LoraforgeError, match="only by llama.cpp's own quantizer") as err:
        export(model_dir, "gguf", out, quant="Q4_K_M", name="pet")
    assert not out.exists()
    export_cmd, quantize = err.value.problems[0].fix.split(": ", 1)[1].split(" && ")
    assert shlex.split(export_cmd) == ["loraforge", "export", str(model_dir), "--to", "gguf", "--out", str(out),
                                       "--quant", "f16", "--name", "pet"]
    expected = ["llama-quantize", str(out / "pet-f16.gguf"), str(out / "pet-Q4_K_M.gguf"), "Q4_K_M"]
    assert shlex.split(quantize) == expected
    res = CliRunner().invoke(app, shlex.split(export_cmd)[1:])
    assert res.exit_code == 0, res.output
    assert (out / "pet-f16.gguf").is_file() and [p.name for p in out.iterdir()] == ["pet-f16.gguf"]
    (last,) = [line for line in res.output.splitlines() if "llama-quantize" in line]
    assert shlex.split(last.split(": ", 1)[1]) == expected  # the f16 export's own closing line: same command
    with pytest.raises(LoraforgeError) as err:  # Ollama: the same, and where the quantized file goes
        export(model_dir, "ollama", tmp_path / "o", quant="q5_k_s")
    assert err.value.problems[0].fix.endswith(f"Q5_K_S (then FROM ./{model_dir.name}-Q5_K_S.gguf in the Modelfile)")
    assert f"--to ollama --out {tmp_path / 'o'} --quant f16" in err.value.problems[0].fix


def test_prompt_learning_adapter_is_refused_by_every_weight_target(tiny_root, tmp_path):
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = _tiny("llama", tiny_root)
    run = tmp_path / "prefix"
    model = AutoModelForCausalLM.from_pretrained(base)
    get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(run)
    (run / "config.yaml").write_text(f"base_model: {base}\nmethod: prefix\n")
    for target, message in (("gguf", "PREFIX_TUNING adapter cannot be exported --to gguf"),
                            ("ollama", "PREFIX_TUNING adapter cannot be exported --to gguf"),
                            ("gguf-lora", "PREFIX_TUNING adapter has no LoRA matrices"),
                            ("vllm", "vLLM serves only LoRA adapters")):
        with pytest.raises(LoraforgeError, match=message):
            export(run, target, tmp_path / target)


def test_vllm_checks_what_its_loader_reads(tiny_root, tmp_path):
    base = _tiny("llama", tiny_root)
    run = _lora_run(base, tmp_path / "run")
    result = export(run, "vllm", tmp_path / "vllm")
    assert {p.name for p in (tmp_path / "vllm").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert "--enable-lora --lora-modules run=" in result.format() and "--max-lora-rank" not in result.format()
    cfg = json.loads((run / "adapter_config.json").read_text())
    assert vllm_problems(cfg, {"adapter_model.safetensors"}) == []
    bad = dict(cfg, use_dora=True, modules_to_save=["lm_head"], r=1024, rank_pattern={"o_proj": 2})
    keys = [p.key for p in vllm_problems(bad, {"adapter_model.bin"})]
    assert keys == ["use_dora", "modules_to_save", "rank_pattern", "r", "adapter_model.safetensors"]
    assert max_lora_rank(8) == 8 and max_lora_rank(17) == 32 and max_lora_rank(300) == 320
    cfg["use_dora"] = True
    (run / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoraforgeError, match="does not support DoRA"):
        export(run, "vllm", tmp_path / "v2")


# ------------------------------------------------------------------------------------------- chat templates

LLAMA2_STYLE = ("{% for m in messages %}{% if m['role'] == 'system' %}{% set sys = m['content'] %}"
                "{% elif m['role'] == 'user' %}[INST] {% if loop.index0 == 1 %}<<SYS>>{{ sys }}<</SYS>> {% endif %}"
                "{{ m['content'] }} [/INST]{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}")


def _go_render(template: str, conversations: list[list[dict]], tmp_path: Path) -> list[str]:
    """Render an Ollama TEMPLATE with Go's text/template, with data shaped like Ollama's (.Messages)."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go toolchain absent (apt-get install golang-go): the Modelfile TEMPLATE is a Go template")
    src = tmp_path / "render.go"
    src.write_text('''package main
import ("encoding/json"; "os"; "text/template"; "strings")
type Message struct { Role string; Content string }
type Data struct { Messages []Message }
func main() {
  tb, _ := os.ReadFile(os.Args[1]); cb, _ := os.ReadFile(os.Args[2])
  t := template.Must(template.New("m").Parse(string(tb)))
  var convs [][]Message
  if err := json.Unmarshal(cb, &convs); err != nil { panic(err) }
  out := []string{}
  for _, c := range convs { var b strings.Builder; if err := t.Execute(&b, Data{c}); err != nil { panic(err) }; out = append(out, b.String()) }
  j, _ := json.Marshal(out); os.Stdout.Write(j)
}''')
    (tmp_path / "t.tmpl").write_text(template)
    data = [[{"Role": m["role"], "Content": m["content"]} for m in c] for c in conversations]
    (tmp_path / "c.json").write_text(json.dumps(data))
    env = {"GOCACHE": str(Path.home() / ".cache" / "go-build"), "HOME": str(Path.home()), "PATH": "/usr/bin:/bin",
           "GOFLAGS": "-mod=mod", "GO111MODULE": "off"}
    res = subprocess.run([go, "run", str(src), str(tmp_path / "t.tmpl"), str(tmp_path / "c.json")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_modelfile_template_renders_like_the_chat_template(smollm2_tokenizer, tmp_path):
    """Ollama appends the generation prompt when the last message is not the assistant's; HF's
    apply_chat_template(add_generation_prompt=True) must give the same text (system, no system → SmolLM2's
    default system turn, multi-turn)."""
    fmt = decompose(run_render(smollm2_tokenizer, "auto"))
    assert "You are a helpful AI assistant named SmolLM" in fmt.default
    conversations = CHECK_CONVERSATIONS + [[{"role": "user", "content": 'quotes " and {{ braces }} and\nnewlines'}]]
    rendered = _go_render(go_template(fmt), conversations, tmp_path)
    for conversation, text in zip(conversations, rendered):
        gen = conversation[-1]["role"] != "assistant"
        expected = smollm2_tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=gen)
        assert text == expected


def test_builtin_template_becomes_jinja_that_renders_the_same(smollm2_tokenizer):
    from loraforge.data.templates import render_text

    fmt = decompose(run_render(smollm2_tokenizer, "chatml"))
    jinja = jinja_template(fmt)
    for conversation in CHECK_CONVERSATIONS:
        # a generation prompt after the assistant's own turn is a continuation, not a new turn (as in Ollama)
        for gen in (True, False) if conversation[-1]["role"] == "user" else (False,):
            hf = smollm2_tokenizer.apply_chat_template(conversation, chat_template=jinja, tokenize=False,
                                                       add_generation_prompt=gen)
            assert hf == render_text(smollm2_tokenizer, conversation, "chatml", add_generation_prompt=gen)


def test_template_without_message_blocks_is_refused(smollm2_tokenizer):
    def render(messages, gen):
        return smollm2_tokenizer.apply_chat_template(list(messages), chat_template=LLAMA2_STYLE, tokenize=False,
                                                     add_generation_prompt=gen)

    with pytest.raises(LoraforgeError, match="cannot be written as per-message blocks") as err:
        decompose(render)
    assert "template: chatml" in err.value.format()


def test_registry_lists_every_target():
    assert list(EXPORTERS) == ["hf", "gguf", "ollama", "gguf-lora", "vllm", "original"]
    assert all(e.help and callable(e.run) for e in EXPORTERS.values())


def test_cli_unknown_target_exits_2_before_torch(tmp_path):
    import os
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "loraforge", "export", str(tmp_path), "--to",
                          "olama", "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "--to: unknown export target" in res.stderr and "did you mean `ollama`?" in res.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported
