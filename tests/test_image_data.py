"""Image data: caption folders, kohya repeats, metadata.jsonl, collected errors, transforms; config routing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loraforge.config import TaskType, config_from_dict, load_config
from loraforge.errors import ConfigError, DataError
from loraforge.image.data import collect_examples, expand_repeats, load_image

REPO = Path(__file__).resolve().parents[1]


def _image(path: Path, size=(40, 30), color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def test_caption_folders_and_kohya_repeats(tmp_path):
    _image(tmp_path / "top.png")
    (tmp_path / "top.txt").write_text("a top image\n")
    _image(tmp_path / "10_cat" / "c1.jpg")
    (tmp_path / "10_cat" / "c1.txt").write_text("a red cat")
    _image(tmp_path / "plain" / "p.png")
    (tmp_path / "plain" / "p.txt").write_text("plain")
    _image(tmp_path / ".ipynb_checkpoints" / "top-checkpoint.png")  # hidden folders are not data

    examples = collect_examples(tmp_path)
    by_name = {e.path.name: e for e in examples}
    assert set(by_name) == {"top.png", "c1.jpg", "p.png"}
    assert by_name["top.png"].caption == "a top image"
    assert (by_name["c1.jpg"].repeats, by_name["top.png"].repeats, by_name["p.png"].repeats) == (10, 1, 1)
    views = expand_repeats(examples)
    assert len(views) == 12 and sum(v.path.name == "c1.jpg" for v in views) == 10


def test_custom_caption_extension(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.caption").write_text("dog")
    assert collect_examples(tmp_path, caption_extension=".caption")[0].caption == "dog"


def test_corrupt_image_and_missing_caption_reported_together(tmp_path):
    _image(tmp_path / "good.png")
    (tmp_path / "good.txt").write_text("ok")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (tmp_path / "broken.txt").write_text("broken")
    full = tmp_path / "truncated.jpg"
    _image(full, size=(64, 64))
    full.write_bytes(full.read_bytes()[:200])  # a truncated JPEG: opens, fails to decode
    (tmp_path / "truncated.txt").write_text("cut")
    _image(tmp_path / "nocap.png")

    with pytest.raises(DataError) as err:
        collect_examples(tmp_path)
    keys = [p.key for p in err.value.problems]
    assert len(keys) == 3
    assert any(k.endswith("broken.png") for k in keys)
    assert any(k.endswith("truncated.jpg") for k in keys)
    assert any(k.endswith("nocap.png") for k in keys)
    assert "no caption file" in err.value.format() and "nocap.txt" in err.value.format()


def test_metadata_jsonl(tmp_path):
    _image(tmp_path / "imgs" / "a.png")
    _image(tmp_path / "imgs" / "b.png")
    meta = tmp_path / "imgs" / "metadata.jsonl"
    meta.write_text(json.dumps({"file_name": "a.png", "text": "first"}) + "\n\n"
                    + json.dumps({"file_name": "b.png", "text": "second"}) + "\n")
    # found automatically in train_data_dir, and given explicitly
    assert [e.caption for e in collect_examples(tmp_path / "imgs")] == ["first", "second"]
    assert [e.path.name for e in collect_examples(None, meta)] == ["a.png", "b.png"]


def test_metadata_errors_name_file_and_line(tmp_path):
    _image(tmp_path / "a.png")
    meta = tmp_path / "metadata.jsonl"
    meta.write_text('{"file_name": "a.png", "text": "ok"}\n{"file_name": "missing.png", "text": "x"}\n'
                    '{"image": "a.png"}\nnot json\n')
    with pytest.raises(DataError) as err:
        collect_examples(tmp_path)
    keys = [p.key for p in err.value.problems]
    assert keys == [f"{meta}:2", f"{meta}:3", f"{meta}:4"]


def test_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match="folder not found"):
        collect_examples(tmp_path / "nope")
    with pytest.raises(DataError, match="no training images found"):
        collect_examples(tmp_path)


def test_load_image_resizes_crops_normalizes(tmp_path):
    # Left half black, right half white, 80x40: after resizing the short side to 16 it is 32x16, and the
    # center crop keeps the middle 16 columns — half black, half white.
    arr = np.zeros((40, 80, 3), dtype=np.uint8)
    arr[:, 40:] = 255
    path = tmp_path / "half.png"
    Image.fromarray(arr).save(path)
    x = load_image(path, 16)
    assert x.shape == (3, 16, 16) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x[:, :, 0].mean() < -0.9 and x[:, :, -1].mean() > 0.9
    flipped = load_image(path, 16, flip=True)
    np.testing.assert_allclose(flipped, x[:, :, ::-1])
    # random crops stay inside the image and differ with the position drawn
    import random

    crops = {load_image(path, 16, center_crop=False, rng=random.Random(s))[0].mean().round(3) for s in range(8)}
    assert len(crops) > 1


def test_load_image_converts_grayscale_and_rgba(tmp_path):
    Image.new("L", (20, 20), 255).save(tmp_path / "g.png")
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(tmp_path / "a.png")
    assert load_image(tmp_path / "g.png", 8).shape == (3, 8, 8)
    assert load_image(tmp_path / "a.png", 8).shape == (3, 8, 8)


@pytest.mark.parametrize("task", ["text-to-image", "image-to-image", "TEXT_TO_IMAGE", "image_to_image"])
def test_task_type_routes_to_image(task):
    cfg = config_from_dict({"task_type": task, "train_data_dir": "data/imgs", "image": {"resolution": 64}})
    assert cfg.task_type is TaskType.TEXT_TO_IMAGE
    assert cfg.image.resolution == 64


def test_unknown_task_type_lists_the_supported_ones():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"task_type": "image-generation", "train_data_dir": "x"})
    text = err.value.format()
    assert "text-to-image" in text and "image-to-image" in text


def test_image_options_are_checked():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"task_type": "text-to-image", "train_data_dir": "x",
                          "image": {"resolutoin": 64, "caption_extension": "txt", "snr_gamma": -1}})
    text = err.value.format()
    assert "image.resolutoin" in text and "did you mean `resolution`?" in text
    assert "image.caption_extension" in text and "image.snr_gamma" in text


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("image-*.yaml")), ids=lambda p: p.name)
def test_shipped_image_configs_load(path):
    cfg = load_config(path)
    assert cfg.task_type is TaskType.TEXT_TO_IMAGE
    assert cfg.image is not None


def test_image_configs_are_shipped():
    assert len(list((REPO / "configs").glob("image-*.yaml"))) >= 2
