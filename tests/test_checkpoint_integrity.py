"""Checkpoints verify before they are resumed, and adapters are checked against their base (issue 22, points 3-5)."""

import json
import shutil

import pytest

from test_train_helpers import rows_file, run, tiny_llama  # noqa: F401


@pytest.fixture(scope="module")
def deeper_llama(tiny_llama, tmp_path_factory):
    """The tiny LLaMA's width with 4 layers instead of 2: every matrix shape is the same, the layer count is not."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("deeper") / "llama4"
    config = AutoConfig.from_pretrained(tiny_llama)
    config.num_hidden_layers = 4
    AutoModelForCausalLM.from_config(config).save_pretrained(out, safe_serialization=True)
    for f in tiny_llama.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.name == "generation_config.json":
            shutil.copy2(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def two_ckpts(tiny_llama, rows_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpts") / "run"
    run(tiny_llama, rows_file, out, max_steps=4, save_steps=2)
    return out


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


@pytest.mark.parametrize("damaged", ["adapter_model.safetensors", "optimizer.pt"])
def test_latest_skips_a_damaged_checkpoint_saying_so(two_ckpts, tiny_llama, rows_file, tmp_path, capsys, damaged):
    from test_train_helpers import train_losses

    out = tmp_path / "run"
    shutil.copytree(two_ckpts, out)
    (out / "adapter_model.safetensors").unlink()
    (out / "run.json").unlink()
    _truncate(out / "checkpoint-4" / damaged)
    from loraforge.train.manifest import verify

    assert verify(out / "checkpoint-2") is None and damaged in verify(out / "checkpoint-4")
    result = run(tiny_llama, rows_file, out, max_steps=5, save_steps=None, overwrite_output_dir=False,
                 resume_from_checkpoint="latest")
    err = capsys.readouterr().err
    assert f"skipping {out / 'checkpoint-4'}: {damaged}" in err
    assert result.global_step == 5 and max(train_losses(out)) == 5


def test_an_explicit_damaged_checkpoint_is_refused(two_ckpts, tiny_llama, rows_file, tmp_path):
    from loraforge.errors import ConfigError
    from loraforge.preflight import PreflightError, run_preflight
    from test_train_helpers import make_cfg

    out = tmp_path / "run"
    shutil.copytree(two_ckpts, out)
    _truncate(out / "checkpoint-4" / "optimizer.pt")
    ckpt = str(out / "checkpoint-4")
    cfg = make_cfg(tiny_llama, rows_file, out, overwrite_output_dir=False, resume_from_checkpoint=ckpt)
    with pytest.raises(PreflightError, match="checkpoint is damaged: optimizer.pt has"):
        run_preflight(cfg, echo=lambda _m: None)
    with pytest.raises(ConfigError, match="checkpoint is damaged"):
        run(tiny_llama, rows_file, out, overwrite_output_dir=False, resume_from_checkpoint=ckpt)


def test_resume_with_a_different_base_is_refused(two_ckpts, deeper_llama, rows_file, tmp_path):
    from loraforge.errors import ConfigError
    from loraforge.preflight import PreflightError, run_preflight
    from test_train_helpers import make_cfg

    out = tmp_path / "run"
    shutil.copytree(two_ckpts, out)
    cfg = make_cfg(deeper_llama, rows_file, out, overwrite_output_dir=False, resume_from_checkpoint="latest")
    with pytest.raises(PreflightError, match="num_hidden_layers 2 vs 4"):
        run_preflight(cfg, echo=lambda _m: None)
    with pytest.raises(ConfigError, match="num_hidden_layers 2 vs 4"):
        run(deeper_llama, rows_file, out, overwrite_output_dir=False, resume_from_checkpoint="latest")


def test_an_adapter_of_another_base_is_refused_everywhere_it_is_loaded(two_ckpts, deeper_llama, tiny_llama, tmp_path):
    from loraforge.errors import ModelError
    from loraforge.export import merge_adapter
    from loraforge.inference import InferenceModel
    from loraforge.models.fit import adapter_fit_problems

    assert adapter_fit_problems(two_ckpts, tiny_llama) == []
    # the recorded base says so
    with pytest.raises(ModelError, match="num_hidden_layers 2 vs 4"):
        InferenceModel.load(str(deeper_llama), {"a": str(two_ckpts)})
    # with no record of its base (a moved adapter), its key coverage does
    moved = tmp_path / "moved"
    shutil.copytree(two_ckpts, moved, ignore=shutil.ignore_patterns("checkpoint-*", "config.yaml"))
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/nowhere/else"
    (moved / "adapter_config.json").write_text(json.dumps(config))
    problems = adapter_fit_problems(moved, deeper_llama)
    assert problems and "missing e.g. `model.layers.2" in problems[0].message, problems
    with pytest.raises(ModelError, match="missing e.g. `model.layers.2"):
        merge_adapter(moved, tmp_path / "merged", base=str(deeper_llama))
    assert not (tmp_path / "merged").exists()
    # a truncated adapter file: a clear refusal, not a SafetensorError
    _truncate(moved / "adapter_model.safetensors", 0.9)
    with pytest.raises(ModelError, match="adapter_model.safetensors is damaged"):
        InferenceModel.load(str(tiny_llama), {"a": str(moved)})


def test_validate_finds_a_truncated_base_weights_file(tiny_llama, rows_file, tmp_path):
    from loraforge.preflight import PreflightError, run_preflight
    from test_train_helpers import make_cfg

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    _truncate(base / "model.safetensors", 0.7)
    with pytest.raises(PreflightError, match="model.safetensors is damaged: .*truncated"):
        run_preflight(make_cfg(base, rows_file, tmp_path / "out"), echo=lambda _m: None)


def test_merge_never_writes_over_the_base_the_run_or_another_model(two_ckpts, tiny_llama, tmp_path):
    from loraforge.errors import LoraforgeError
    from loraforge.export import merge_adapter

    for out in (tiny_llama, tiny_llama / "merged", two_ckpts / "merged"):
        with pytest.raises(LoraforgeError, match="which the merge reads"):
            merge_adapter(two_ckpts, out, base=str(tiny_llama), verify=False, overwrite=True)
    other = tmp_path / "other"
    shutil.copytree(tiny_llama, other)
    for overwrite in (False, True):  # another model's folder is never written into, --overwrite or not
        with pytest.raises(LoraforgeError, match="is inside the model folder"):
            merge_adapter(two_ckpts, other, base=str(tiny_llama), verify=False, overwrite=overwrite)
    assert sorted(f.name for f in other.iterdir()) == sorted(f.name for f in tiny_llama.iterdir())
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(LoraforgeError, match="merge ... --overwrite"):  # the fix names an option merge has
        merge_adapter(two_ckpts, notes, base=str(tiny_llama), verify=False)
    assert (notes / "todo.txt").read_text() == "keep me"
    merged = merge_adapter(two_ckpts, tmp_path / "m", base=str(tiny_llama), verify=False)
    merge_adapter(two_ckpts, merged.out_dir, base=str(tiny_llama), verify=False, overwrite=True)  # an earlier merge
