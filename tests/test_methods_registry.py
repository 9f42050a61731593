"""The method records (`loraforge.methods.METHODS`) are the one source of what loraforge knows about a method.

- the config's `Method` literal, its `METHOD_OPTIONS` and `METHODS` list the same methods, in the same order;
- every method-specific config key is owned by some method, so the loader's ownership rule covers it;
- `loraforge.config` imports neither torch nor `loraforge.methods`; `preflight` and `estimate` import no torch
  at module import;
- no code outside `methods/` (and the config side in `config/methods.py`) compares `method` with a name;
- a method defined in this file, registered at run time with no other file edited, goes through the public
  paths: `loraforge validate` → `loraforge train` (2 steps) → run dir → reload with plain PEFT, and
  `estimate` counts its parameters as the trainer did.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from loraforge.config.methods import METHOD_OPTIONS, MethodOptions, key_owners
from loraforge.config.schema import Method as MethodLiteral
from loraforge.config.schema import MethodSection
from loraforge.errors import Problem
from loraforge.methods import METHODS
from loraforge.methods.base import Method, ModelShape, ParamEstimate

PACKAGE = Path(__file__).resolve().parents[1] / "loraforge"


def test_the_literal_the_options_and_the_records_list_the_same_methods():
    assert list(typing.get_args(MethodLiteral)) == list(METHOD_OPTIONS) == list(METHODS)
    for name, record in METHODS.items():
        assert record.name == name and record.options is METHOD_OPTIONS[name]


def test_every_method_key_is_owned_and_every_owned_key_exists():
    owners = key_owners()
    fields = set(MethodSection.model_fields)
    assert set(owners) <= fields
    shared = {"method", "modules_to_save", "init_adapter"}  # keys every method reads
    assert fields - shared <= set(owners), sorted(fields - shared - set(owners))
    assert owners["lora_rank"] == ("lora", "qlora") and owners["num_virtual_tokens"] == ("prefix", "ptuning", "prompt")


def _imported_after(statement: str) -> list[str]:
    code = f"import sys\n{statement}\nprint(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'peft', " \
           f"'transformers') or m.startswith('loraforge.methods')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return eval(out.stdout.strip())  # noqa: S307 - our own printed list


def test_config_imports_neither_torch_nor_methods():
    assert _imported_after("import loraforge.config; loraforge.config.config_from_dict("
                           "{'metadata_path': 'x.jsonl', 'method': 'qlora'})") == []


def test_preflight_and_estimate_import_no_torch_at_module_import():
    loaded = _imported_after("import loraforge.preflight, loraforge.estimate")
    assert not [m for m in loaded if not m.startswith("loraforge.")], loaded


# A comparison of a method name with a literal: `method == "lora"`, `cfg.method in ("full", …)`.
_NAME_BRANCH = re.compile(r"""(?<!request\.)\bmethod\b["')\]]*\s*(==|!=|\bin\b|\bnot in\b)\s*[\(\[]?\s*["']""")


def test_no_method_name_branches_outside_the_method_modules():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("methods/") or rel == "config/methods.py":
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if _NAME_BRANCH.search(line.split("#")[0]):
                offenders.append(f"{rel}:{i}: {line.strip()}")
    assert not offenders, "ask the method's record instead:\n" + "\n".join(offenders)


def test_an_unregistered_method_is_refused_with_the_registered_names():
    from loraforge.config import config_from_dict
    from loraforge.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        config_from_dict({"metadata_path": "x.jsonl", "method": "lorra"})
    problem = info.value.problems[0]
    assert (problem.key, problem.value) == ("method", "lorra")
    assert problem.allowed == ", ".join(METHODS) and "did you mean `lora`?" in problem.fix


# ---------------------------------------------------------------------------------------------------------------
# A new method, defined here and registered at run time: IA³ (Liu et al. 2022, "Few-Shot Parameter-Efficient
# Fine-Tuning is Better and Cheaper than In-Context Learning", arXiv:2205.05638) through PEFT — learned vectors
# that rescale the keys, values and the feed-forward input. PEFT saves it as an ordinary adapter.

IA3_ATTENTION, IA3_FEEDFORWARD = ("k_proj", "v_proj"), ("down_proj",)


def ia3_apply(model, cfg):
    from peft import IA3Config, get_peft_model

    from loraforge.methods.common import peft_task_type

    config = IA3Config(task_type=peft_task_type(cfg.task_type), target_modules=[*IA3_ATTENTION, *IA3_FEEDFORWARD],
                       feedforward_modules=list(IA3_FEEDFORWARD))
    return get_peft_model(model, config)


def ia3_estimate(cfg, shape: ModelShape) -> ParamEstimate:
    """One vector per adapted linear: its output size (keys, values), its input size (feed-forward)."""
    new = sum(l["out"] if l["leaf"] in IA3_ATTENTION else l["in"] for l in shape.linears
              if l["leaf"] in IA3_ATTENTION + IA3_FEEDFORWARD)
    adapted = tuple(l for l in shape.linears if l["leaf"] in IA3_ATTENTION + IA3_FEEDFORWARD)
    return ParamEstimate(new_params=new, adapted=adapted)


def ia3_verify(report, cfg) -> list[Problem]:
    stray = [n for n in report.trainable_names if ".ia3_l." not in n]
    return [Problem("method", f"base weights train in an IA3 run: {stray[:3]}", value=cfg.method)] if stray else []


IA3 = Method(options=MethodOptions("ia3", default_learning_rate=3e-3), apply=ia3_apply, saves_adapter=True,
             estimate_params=ia3_estimate, verify=ia3_verify)


def _cli(*argv: str) -> str:
    from loraforge.cli import main

    buf = io.StringIO()
    old = sys.argv
    sys.argv = ["loraforge", *argv]
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                main()
            except SystemExit as exit_:
                raise AssertionError(f"exit {exit_.code}:\n{buf.getvalue()}") from None
    finally:
        sys.argv = old
    return buf.getvalue()


def test_a_method_defined_here_validates_trains_saves_and_reloads(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraforge.config import load_config
    from loraforge.estimate import estimate_memory
    from loraforge.models.tiny import tiny_model_dir

    # the registration: the config side and the record, nothing else
    monkeypatch.setitem(METHOD_OPTIONS, IA3.name, IA3.options)
    monkeypatch.setitem(METHODS, IA3.name, IA3)

    model_dir = tiny_model_dir("llama", tmp_path / "models")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Question {i}: what helps a cold?",
                                        "output": "Rest, fluids and time." if i % 2 else "See a doctor."}) + "\n"
                            for i in range(8)))
    out = tmp_path / "run"
    config = tmp_path / "ia3.yaml"
    config.write_text(f"base_model: {model_dir}\nmetadata_path: {data}\nmethod: ia3\noutput_dir: {out}\n"
                      "max_steps: 2\nbatch_size: 2\nlearning_rate: 5.0e-2\nlogging_steps: 1\nsave_steps: 1\n"
                      "precision: fp32\ncutoff_len: 64\ntokenized_cache: false\nreport_to: [none]\nplot_loss: false\n")

    validated = _cli("validate", str(config))
    assert "method ia3" in validated and "batching packed" in validated and "config OK" in validated
    trained = _cli("train", str(config))
    assert f"Adapter saved in {out}" in trained

    # the run dir is an IA3 adapter dir (checkpoints too), and run.json tells what trained
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "IA3"
    run = json.loads((out / "run.json").read_text())
    assert (run["method"], run["global_step"]) == ("ia3", 2)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]

    # reload by the public path of the run-dir contract: plain PEFT on the plain base
    ids = torch.tensor([[1, 17, 42, 99, 7]])

    def logits(model):
        with torch.no_grad():
            return model.eval()(input_ids=ids).logits

    base = logits(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    tuned = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                             out))
    final_ckpt = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir,
                                                                                       dtype=torch.float32),
                                                  out / "checkpoint-2"))
    assert (tuned - base).abs().max() > 1e-4  # two steps at 5e-2 moved the scaling vectors
    assert torch.equal(tuned, final_ckpt)

    # estimate asks the same record: its parameter count is the trainer's
    est = estimate_memory(load_config(config), baseline_bytes=0, device="cpu")
    assert (est.trainable_params, est.total_params) == (run["trainable_params"], run["total_params"])
