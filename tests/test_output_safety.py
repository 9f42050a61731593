"""No command writes over a model folder, a run it reads or a run folder (issue 22, point 1, "in any command"):
every command that writes refuses such an --out with exit 2 and a message naming it, before reading anything,
and the folders are byte-for-byte unchanged afterwards."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from loraforge.exporters import EXPORTERS


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def places(tmp_path):
    model = tmp_path / "model"  # someone else's model: config.json and weights, no run record
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (model / "model.safetensors").write_bytes(b"weights")
    run = tmp_path / "run"  # a training run
    run.mkdir()
    (run / "run.json").write_text("{}")
    (run / "adapter_config.json").write_text("{}")
    (run / "adapter_model.safetensors").write_bytes(b"adapter")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    data = tmp_path / "test.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    return model, run, gguf, data


def _run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    from loraforge import cli

    monkeypatch.setattr(sys, "argv", ["loraforge", *map(str, args)])
    with pytest.raises(SystemExit) as done:
        cli.main()
    return done.value.code, capsys.readouterr().err


def _commands(model: Path, run: Path, gguf: Path, data: Path) -> list[tuple[str, list]]:
    inside = model / "sub"
    cases = [("import-gguf into the model", ["import-gguf", gguf, model]),
             ("import-gguf inside the model", ["import-gguf", gguf, inside]),
             ("convert onto its source", ["convert", model, model]),
             ("convert inside a model", ["convert", run, inside]),
             ("merge inside the base", ["merge", run, "--out", inside, "--base", model]),
             ("export-original onto the run", ["export-original", run, "--out", run]),
             ("export-kohya into a model", ["export-kohya", run, "--out", inside / "lora.safetensors"]),
             ("eval report into the base", ["eval", "--data", data, "--base", model, "--out", model]),
             ("eval report into an adapter", ["eval", "--data", data, "--base", model, "--adapter", f"a={run}",
                                              "--out", run]),
             ("generate-image into a model", ["generate-image", "--prompt", "x", "--base", run,
                                              "--out", model / "x.png"])]
    for target in EXPORTERS:
        cases += [(f"export --to {target} onto the run", ["export", run, "--to", target, "--out", run, "--overwrite"]),
                  (f"export --to {target} over the run's parent", ["export", run, "--to", target,
                                                                   "--out", run.parent, "--overwrite"]),
                  (f"export --to {target} into a model", ["export", run, "--to", target, "--out", inside])]
    return cases


def test_every_writing_command_refuses_an_out_that_would_damage_a_model_or_run(places, monkeypatch, capsys):
    model, run, gguf, data = places
    before = {p: _tree(p) for p in (model, run)}
    failures = []
    for label, args in _commands(*places):
        code, err = _run_cli(monkeypatch, capsys, *args)
        if code != 2 or "Traceback" in err or not ("model folder" in err or "overlaps" in err or "run folder" in err):
            failures.append(f"{label}: exit {code}\n{err}")
    assert not failures, "\n\n".join(failures)
    assert {p: _tree(p) for p in (model, run)} == before
    assert not (model / "sub").exists()


def test_a_run_folder_is_never_replaced_but_may_hold_exports(places):
    from loraforge.train.rundir import output_path_problems

    model, run, _, _ = places
    assert output_path_problems(run / "gguf", [])  == []  # a subfolder of a run: fine
    [problem] = output_path_problems(run, [])
    assert "run folder" in problem.message and problem.key == "--out"
    assert output_path_problems(run, [], replaces=False) == []  # a report beside the run's files replaces nothing
    merged = model.parent / "merged"  # a model loraforge wrote may be replaced by its own command's --overwrite
    merged.mkdir()
    for name in ("config.json", "model.safetensors", "loraforge_merge.json"):
        (merged / name).write_text("{}")
    assert output_path_problems(merged, []) == []
    [problem] = output_path_problems(merged / "inside", [])
    assert "inside the model folder" in problem.message
