"""Stable Diffusion LoRA end to end on a tiny random pipeline (CPU, no downloads).

train → the run dir loads with diffusers' `load_lora_weights` and reproduces the training-time validation image;
kohya export round-trips through diffusers' own kohya loader with the true alpha; resume replays the exact
losses; image-to-image and weighted LoRA mixing work; mistakes raise loraforge errors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from loraforge.config import config_from_dict  # noqa: E402
from loraforge.errors import ConfigError, ModelError  # noqa: E402

PROMPT = "a red cat"
RES = 32
# rank 4 with alpha 8: a kohya export that wrote alpha = rank would halve the LoRA and fail the round trip.
RANK, ALPHA = 4, 8


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from loraforge.image.tiny import tiny_pipeline_dir

    return tiny_pipeline_dir(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Six 40×48 images of two flat colours with a gradient, captioned, in a kohya `2_` folder."""
    root = tmp_path_factory.mktemp("images")
    folder = root / "2_cat"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        arr = np.zeros((48, 40, 3), dtype=np.uint8)
        arr[..., 0] = np.linspace(120, 255, 40, dtype=np.uint8)[None, :]
        arr[..., 1] = 20 + 10 * i
        arr = np.clip(arr + rng.integers(0, 20, arr.shape), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"cat{i}.png")
        (folder / f"cat{i}.txt").write_text(PROMPT)
    return root


def _cfg(base: Path, data: Path, out: Path, **over):
    image = {"resolution": RES, "num_inference_steps": 3, "guidance_scale": 2.0, **over.pop("image", {})}
    raw = {"task_type": "text-to-image", "base_model": str(base), "train_data_dir": str(data), "output_dir": str(out),
           "lora_rank": RANK, "lora_alpha": ALPHA, "batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 4,
           "learning_rate": 5e-3, "lr_scheduler": "cosine", "warmup_steps": 1, "precision": "fp32", "save_steps": 2,
           "logging_steps": 1, "seed": 7, "report_to": ["none"], "image": image, **over}
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def run(base, data_dir, tmp_path_factory) -> Path:
    """Four optimizer steps (2 micro-batches each), checkpoints at step 2, validation at steps 2 and 4."""
    from loraforge.image.train import train_image_lora

    out = tmp_path_factory.mktemp("runs") / "run"
    cfg = _cfg(base, data_dir, out, image={"validation_prompts": [PROMPT], "validation_steps": 2})
    assert train_image_lora(cfg, echo=lambda _m: None) == out
    return out


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _unet_outputs(pipe) -> torch.Tensor:
    """UNet noise prediction on fixed inputs with the pipeline's own text encoding."""
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, RES // 2, RES // 2, generator=g)
    ids = pipe.tokenizer([PROMPT, "a dog"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
        return pipe.unet(latents, torch.tensor([10, 700]), text).sample


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_training_writes_a_complete_run(run):
    names = {p.name for p in run.iterdir()}
    assert {"pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "config.yaml", "run.json", "metrics.jsonl",
            "loss.png", "validation", "checkpoint-2"} <= names
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    assert rows[0]["lr"] > 0
    assert sorted(p.name for p in (run / "validation").iterdir()) == ["step-000002-0.png", "step-000004-0.png"]
    info = json.loads((run / "run.json").read_text())
    assert info["global_step"] == 4 and info["images"] == 3 and info["views_per_epoch"] == 6
    # the resolved config is saved, every default filled in
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["task_type"] == "TEXT_TO_IMAGE" and saved["lora_alpha"] == ALPHA
    assert saved["image"]["resolution"] == RES


def test_saved_lora_reproduces_training_time_image_and_changes_the_base(run, base):
    from loraforge.image.generate import generate_image, load_generation_pipeline, render

    kwargs = dict(num_inference_steps=3, guidance_scale=2.0, seed=7, height=RES, width=RES)
    with_lora = generate_image(base, PROMPT, loras=[(run, 1.0)], **kwargs)
    # the validation image rendered inside training at the last step, from the same seed and settings
    at_training = Image.open(run / "validation" / "step-000004-0.png")
    np.testing.assert_array_equal(_pixels(with_lora), _pixels(at_training))

    plain = load_generation_pipeline(base)
    without = render(plain, PROMPT, **kwargs)
    assert np.abs(_pixels(with_lora) - _pixels(without)).max() > 0
    # plain diffusers gets a deterministic adapter: no active dropout after load_lora_weights
    from loraforge.image.pipeline import load_pipeline

    plain_diffusers = load_pipeline(base)
    plain_diffusers.load_lora_weights(str(run))
    assert not [m for m in plain_diffusers.unet.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    # weight 0 switches the LoRA off: the base image again
    off = render(load_generation_pipeline(base, [(run, 0.0)]), PROMPT, **kwargs)
    np.testing.assert_array_equal(_pixels(off), _pixels(without))


def test_kohya_export_round_trips_through_diffusers_with_true_alpha(run, base, tmp_path):
    from safetensors.torch import load_file

    from loraforge.image.generate import load_generation_pipeline
    from loraforge.image.kohya import export_kohya

    kohya = load_file(str(run / "lora_kohya.safetensors"))
    assert all(k.startswith("lora_unet_") for k in kohya)
    to_q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert f"{to_q}.lora_down.weight" in kohya
    assert any(k.endswith("to_out_0.lora_up.weight") for k in kohya)
    alphas = {float(v) for k, v in kohya.items() if k.endswith(".alpha")}
    assert alphas == {float(ALPHA)}
    assert kohya[f"{to_q}.lora_down.weight"].shape[0] == RANK

    diffusers_out = _unet_outputs(load_generation_pipeline(base, [(run, 1.0)]))
    kohya_out = _unet_outputs(load_generation_pipeline(base, [(run / "lora_kohya.safetensors", 1.0)]))
    base_out = _unet_outputs(load_generation_pipeline(base))
    assert (diffusers_out - base_out).abs().max() > 1e-3  # the LoRA matters on these inputs
    torch.testing.assert_close(kohya_out, diffusers_out, atol=1e-5, rtol=1e-5)

    # the trap this guards against: alpha = rank gives a different (half-strength) LoRA
    wrong = export_kohya(run, tmp_path / "wrong.safetensors", alpha=RANK)
    wrong_out = _unet_outputs(load_generation_pipeline(base, [(wrong, 1.0)]))
    assert (wrong_out - diffusers_out).abs().max() > 1e-4


def test_kohya_export_refuses_to_guess_alpha(run, tmp_path):
    from safetensors.torch import load_file, save_file

    from loraforge.image.kohya import export_kohya

    bare = tmp_path / "bare.safetensors"  # the weights without header metadata and without config.yaml
    save_file(load_file(str(run / "pytorch_lora_weights.safetensors")), str(bare))
    with pytest.raises(ModelError, match="alpha is not recorded"):
        export_kohya(bare, tmp_path / "out.safetensors")
    out = export_kohya(bare, tmp_path / "out.safetensors", alpha=ALPHA)
    assert {float(v) for k, v in load_file(str(out)).items() if k.endswith(".alpha")} == {float(ALPHA)}
    # older diffusers files carry a per-module `<module>.alpha`: used as is
    weights = load_file(str(bare))
    modules = {k.rsplit(".lora", 1)[0] for k in weights}
    with_alphas = tmp_path / "alphas.safetensors"
    save_file({**weights, **{f"{m}.alpha": torch.tensor(3.0) for m in modules}}, str(with_alphas))
    out = export_kohya(with_alphas, tmp_path / "out2.safetensors")
    assert {float(v) for k, v in load_file(str(out)).items() if k.endswith(".alpha")} == {3.0}


def test_ctrl_c_checkpoints_and_resume_replays_the_uninterrupted_run(run, base, data_dir, tmp_path, monkeypatch):
    import os
    import signal

    from safetensors.torch import load_file

    import loraforge.image.train as image_train
    from loraforge.train.loop import TrainingInterrupted

    # Ctrl-C arrives during the first micro-batch of step 2 (the third micro-batch): the step finishes,
    # is checkpointed, and training stops.
    calls = []
    real_loss = image_train._micro_batch_loss

    def loss_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_loss(*args, **kwargs)

    resumed = tmp_path / "resumed"
    settings = {"image": {"validation_prompts": [PROMPT], "validation_steps": 2}}
    with monkeypatch.context() as m:
        m.setattr(image_train, "_micro_batch_loss", loss_then_interrupt)
        with pytest.raises(TrainingInterrupted) as stopped:
            image_train.train_image_lora(_cfg(base, data_dir, resumed, save_steps=3, **settings), echo=lambda _m: None)
    assert stopped.value.checkpoint == resumed / "checkpoint-2"
    assert not (resumed / "pytorch_lora_weights.safetensors").exists()
    with (resumed / "metrics.jsonl").open("a") as f:
        f.write("{\"step\": 3, \"loss\": 123.0}\n")  # a line a crash could leave after the checkpoint

    cfg = _cfg(base, data_dir, resumed, resume_from_checkpoint="latest", **settings)
    image_train.train_image_lora(cfg, echo=lambda _m: None)

    expected, got = _metrics(run), _metrics(resumed)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in expected], rtol=1e-6)
    np.testing.assert_allclose([r["lr"] for r in got], [r["lr"] for r in expected], rtol=1e-9)
    a = load_file(str(run / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_a_diverged_loss_stops_with_the_text_recipes_error(base, data_dir, tmp_path, monkeypatch):
    """Both recipes share one engine: a NaN loss in step 2 raises the text recipe's TrainingDiverged, naming the
    step and the last good checkpoint, and leaves no final LoRA."""
    import loraforge.image.train as image_train
    from loraforge.train.loop import TrainingDiverged

    calls = []
    real_loss = image_train._micro_batch_loss

    def nan_from_step_2(*args, **kwargs):  # micro-batches 3 and 4 make step 2 (2 per step)
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) > 2 else loss

    monkeypatch.setattr(image_train, "_micro_batch_loss", nan_from_step_2)
    out = tmp_path / "nan"
    with pytest.raises(TrainingDiverged) as e:
        image_train.train_image_lora(_cfg(base, data_dir, out, save_steps=1), echo=lambda _m: None)
    text = e.value.format()
    assert "step 2: loss is nan" in text and f"last good checkpoint: {out / 'checkpoint-1'}" in text
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    assert [r["step"] for r in _metrics(out)] == [1]


def test_text_encoder_v_prediction_min_snr_bf16(base, data_dir, tmp_path):
    """Every optional switch at once: trains, saves a text-encoder LoRA, and it round-trips through kohya
    (with rsLoRA the scale is alpha/√r, so the exported alpha must be alpha·√r)."""
    from safetensors.torch import load_file

    from loraforge.image.generate import load_generation_pipeline
    from loraforge.image.train import train_image_lora

    out = tmp_path / "te"
    cfg = _cfg(base, data_dir, out, max_steps=3, save_steps=1, precision="bf16", lora_dropout=0.0,
               save_total_limit=1, gradient_checkpointing=True, use_rslora=True,
               target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"],
               image={"train_text_encoder": True, "prediction_type": "v_prediction", "snr_gamma": 5.0,
                      "noise_offset": 0.1, "random_flip": True, "center_crop": False})
    train_image_lora(cfg, echo=lambda _m: None)
    assert all(np.isfinite(r["loss"]) for r in _metrics(out))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # save_total_limit: 1
    weights = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert any(k.startswith("text_encoder.") for k in weights) and any(k.startswith("unet.") for k in weights)
    # lora_up starts at zero: nonzero after two steps means gradients reached both (checkpointed) models
    for prefix in ("unet.", "text_encoder."):
        assert max(float(v.abs().max()) for k, v in weights.items() if k.startswith(prefix) and ".lora_B." in k) > 0
    kohya = load_file(str(out / "lora_kohya.safetensors"))
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in kohya)

    diffusers_pipe = load_generation_pipeline(base, [(out, 1.0)])
    kohya_pipe = load_generation_pipeline(base, [(out / "lora_kohya.safetensors", 1.0)])
    # every saved module comes back as an adapter (attention and non-attention targets alike)
    saved = {k.split(".", 1)[1].rsplit(".lora", 1)[0] for k in weights if k.startswith("unet.")}
    loaded = {n for n, m in diffusers_pipe.unet.named_modules() if hasattr(m, "lora_A") and m.lora_A}
    assert loaded == saved and any("proj_in" in n for n in loaded)
    torch.testing.assert_close(_unet_outputs(kohya_pipe), _unet_outputs(diffusers_pipe), atol=1e-5, rtol=1e-5)


def test_image_to_image(run, base, tmp_path):
    from loraforge.image.generate import generate_image, load_generation_pipeline, render

    init = Image.new("RGB", (48, 40), (250, 250, 0))
    init.save(tmp_path / "init.png")
    out_file = tmp_path / "out" / "img.png"
    image = generate_image(base, PROMPT, loras=[(run, 0.7)], init_image=tmp_path / "init.png", strength=0.6,
                           num_inference_steps=4, guidance_scale=2.0, out_path=out_file)
    assert out_file.is_file() and image.size == (48, 40)
    pipe = load_generation_pipeline(base, [(run, 0.7)])
    weak = render(pipe, PROMPT, init_image=init, strength=0.25, num_inference_steps=4, guidance_scale=2.0)
    strong = render(pipe, PROMPT, init_image=init, strength=1.0, num_inference_steps=4, guidance_scale=2.0)
    yellow = _pixels(init)
    # a low strength stays nearer the init image than a full-strength run
    assert np.abs(_pixels(weak) - yellow).mean() < np.abs(_pixels(strong) - yellow).mean()
    with pytest.raises(ConfigError, match="strength"):
        render(pipe, PROMPT, init_image=init, strength=1.5)


def test_user_mistakes_are_loraforge_errors(base, data_dir, tmp_path, run):
    from loraforge.image.generate import generate_image, parse_lora_arg
    from loraforge.image.train import train_image_lora

    with pytest.raises(ModelError, match="no local Stable Diffusion model"):
        train_image_lora(_cfg(tmp_path / "missing", data_dir, tmp_path / "a"), echo=lambda _m: None)
    with pytest.raises(ConfigError) as err:
        train_image_lora(_cfg(base, data_dir, tmp_path / "b", target_modules=["to_q", "to_kk"]), echo=lambda _m: None)
    assert "target_modules[1]" in err.value.format() and "did you mean `to_k`?" in err.value.format()
    with pytest.raises(ConfigError, match="multiple of the VAE"):
        train_image_lora(_cfg(base, data_dir, tmp_path / "c", image={"resolution": 33}), echo=lambda _m: None)
    with pytest.raises(ConfigError, match="already holds a training run"):
        train_image_lora(_cfg(base, data_dir, run), echo=lambda _m: None)
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        train_image_lora(_cfg(base, data_dir, tmp_path / "d", resume_from_checkpoint="latest"), echo=lambda _m: None)
    with pytest.raises(ModelError, match="LoRA not found"):
        generate_image(base, PROMPT, loras=[(tmp_path / "nope", 1.0)])
    assert parse_lora_arg("runs/cat:0.8") == ("runs/cat", 0.8)
    assert parse_lora_arg("runs/cat") == ("runs/cat", 1.0)


def test_single_file_checkpoint_errors_are_model_errors(base, data_dir, tmp_path):
    from loraforge.image.pipeline import load_pipeline

    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="single-file checkpoint cannot be loaded offline"):
        load_pipeline(bogus)
    with pytest.raises(ModelError, match="no model_index.json"):
        load_pipeline(bogus, base_config=tmp_path)
    with pytest.raises(ModelError, match="not a diffusers pipeline dir"):
        load_pipeline(tmp_path)


def test_cli_routes_image_to_image_config_to_the_image_trainer(base, data_dir, tmp_path):
    """`loraforge train` on the article's `task_type: image-to-image`, then generate-image and export-kohya."""
    import yaml
    from typer.testing import CliRunner

    from loraforge.cli import app

    out = tmp_path / "cli-run"
    cfg = {"task_type": "image-to-image", "base_model": str(base), "train_data_dir": str(data_dir),
           "output_dir": str(out), "lora_rank": RANK, "lora_alpha": ALPHA, "batch_size": 2, "max_steps": 1,
           "precision": "fp32", "report_to": ["none"], "image": {"resolution": RES}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(tmp_path / "cfg.yaml")])
    assert result.exit_code == 0, result.output
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "lora_kohya.safetensors").is_file()

    image = tmp_path / "img.png"
    result = runner.invoke(app, ["generate-image", "--prompt", PROMPT, "--base", str(base), "--lora", f"{out}:0.5",
                                 "--steps", "2", "--out", str(image)])
    assert result.exit_code == 0, result.output
    assert Image.open(image).size == (64, 64)  # the tiny pipeline's default size
    result = runner.invoke(app, ["export-kohya", str(out), "--out", str(tmp_path / "k.safetensors")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "k.safetensors").is_file()


def test_sdxl_lora_with_both_text_encoders(data_dir, tmp_path):
    """SDXL: two text encoders + size conditioning; kohya te1/te2 export round-trips; validation image reproduces."""
    from safetensors.torch import load_file

    from loraforge.image.generate import generate_image, load_generation_pipeline
    from loraforge.image.tiny import tiny_sdxl_pipeline_dir
    from loraforge.image.train import train_image_lora

    base = tiny_sdxl_pipeline_dir(tmp_path / "sdxl")
    out = tmp_path / "sdxl-run"
    cfg = _cfg(base, data_dir, out, max_steps=2, save_steps=None, lora_dropout=0.0,
               image={"train_text_encoder": True, "validation_prompts": [PROMPT], "center_crop": False})
    train_image_lora(cfg, echo=lambda _m: None)
    assert all(np.isfinite(r["loss"]) for r in _metrics(out))
    kohya = load_file(str(out / "lora_kohya.safetensors"))
    assert {k.split("_")[1] for k in kohya} == {"unet", "te1", "te2"}

    def unet_out(pipe):
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=[PROMPT], device=torch.device("cpu"),
                                                  do_classifier_free_guidance=False)
        latents = torch.randn(1, 4, RES // 2, RES // 2, generator=torch.Generator().manual_seed(3))
        time_ids = torch.tensor([[48.0, 40.0, 0.0, 4.0, RES, RES]])
        with torch.no_grad():
            return pipe.unet(latents, torch.tensor([300]), embeds,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample

    diffusers_out = unet_out(load_generation_pipeline(base, [(out, 1.0)]))
    kohya_out = unet_out(load_generation_pipeline(base, [(out / "lora_kohya.safetensors", 1.0)]))
    assert (diffusers_out - unet_out(load_generation_pipeline(base))).abs().max() > 1e-3
    torch.testing.assert_close(kohya_out, diffusers_out, atol=1e-5, rtol=1e-5)

    image = generate_image(base, PROMPT, loras=[(out, 1.0)], num_inference_steps=3, guidance_scale=2.0, seed=7,
                           height=RES, width=RES)
    np.testing.assert_array_equal(_pixels(image), _pixels(Image.open(out / "validation" / "step-000002-0.png")))


def test_preflight_reports_every_problem_without_loading_weights(base, data_dir, tmp_path):
    from loraforge.image.preflight import check_image_run
    from loraforge.image.train import train_image_lora

    assert check_image_run(_cfg(base, data_dir, tmp_path / "ok")) == []
    bad_data = tmp_path / "bad"
    shutil.copytree(data_dir, bad_data)
    (bad_data / "2_cat" / "cat0.txt").unlink()
    cfg = _cfg(base, bad_data, tmp_path / "x", target_modules=["to_q", "to_vv"],
               image={"resolution": 33, "validation_steps": 5})
    keys = [p.key for p in check_image_run(cfg)]
    assert keys[0] == "image.validation_steps"
    assert any(k.endswith("cat0.png") for k in keys)
    assert "image.resolution" in keys and "target_modules[1]" in keys
    with pytest.raises(ConfigError, match="validation_prompts is empty"):
        train_image_lora(cfg, echo=lambda _m: None)


def test_training_lowers_the_loss_on_its_data(base, data_dir, tmp_path):
    """Real learning, not just a finite loss: at the same fixed noise and timesteps, base + LoRA fits the
    training images better than the base (measured 1.107 → 1.016 with these settings)."""
    from loraforge.image.data import collect_examples
    from loraforge.image.generate import load_generation_pipeline
    from loraforge.image.train import fixed_noise_loss, train_image_lora

    cfg = _cfg(base, data_dir, tmp_path / "learn", max_steps=10, batch_size=3, gradient_accumulation_steps=1,
               learning_rate=1e-2, save_steps=None)
    out = train_image_lora(cfg, echo=lambda _m: None)
    examples = collect_examples(data_dir)
    before = fixed_noise_loss(load_generation_pipeline(base), cfg.image, examples, range(8))
    after = fixed_noise_loss(load_generation_pipeline(base, [(out, 1.0)]), cfg.image, examples, range(8))
    assert after < before - 0.03, (before, after)
