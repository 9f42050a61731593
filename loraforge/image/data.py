"""Image + caption training data for Stable Diffusion LoRA.

Two layouts, as in kohya sd-scripts and the diffusers examples:

* caption folders: ``photo.png`` + ``photo.txt`` side by side; a subfolder named ``N_name`` (kohya style)
  repeats each of its images N times per epoch;
* ``metadata.jsonl`` (Hugging Face imagefolder style): one ``{"file_name": ..., "text": ...}`` per line, the
  file names relative to ``train_data_dir`` (or to the metadata file's folder when there is none).

Every image is decoded once up front, so a corrupt file or a missing caption is reported — all of them together,
by file name — before any model is loaded. Transforms use PIL + numpy only (no torchvision on this stack).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loraforge.errors import DataError, Problem

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_NAME = "metadata.jsonl"
_REPEAT_DIR = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class ImageExample:
    """One training image and its caption; ``repeats`` copies of it are seen per epoch."""

    path: Path
    caption: str
    repeats: int = 1


def collect_examples(
    train_data_dir: Path | str | None,
    metadata_path: Path | str | None = None,
    caption_extension: str = ".txt",
) -> list[ImageExample]:
    """Find every (image, caption) pair and check that each image decodes.

    ``metadata_path`` wins when given; otherwise a ``metadata.jsonl`` at the top of ``train_data_dir`` is used;
    otherwise caption files beside the images.

    Raises:
        DataError: listing every missing folder, unreadable image, missing caption and bad metadata line.
    """
    if metadata_path is None and train_data_dir is not None and (Path(train_data_dir) / METADATA_NAME).is_file():
        metadata_path = Path(train_data_dir) / METADATA_NAME
    if metadata_path is not None:
        examples, problems = _from_metadata(Path(metadata_path), Path(train_data_dir) if train_data_dir else None)
    elif train_data_dir is not None:
        examples, problems = _from_caption_folders(Path(train_data_dir), caption_extension)
    else:
        raise DataError([Problem("train_data_dir", "no training images given",
                                 fix="set `train_data_dir: path/to/images`")])
    problems += [p for ex in examples if (p := _check_image(ex.path)) is not None]
    if not examples and not problems:
        where = str(metadata_path or train_data_dir)
        problems.append(Problem(where, "no training images found", allowed=", ".join(IMAGE_EXTENSIONS),
                                fix="put images with caption files there, or a metadata.jsonl with file_name/text"))
    if problems:
        raise DataError(problems)
    return examples


def expand_repeats(examples: list[ImageExample]) -> list[ImageExample]:
    """One entry per image view in an epoch: an image of a ``10_name`` folder appears 10 times."""
    return [ex for ex in examples for _ in range(ex.repeats)]


def _from_caption_folders(root: Path, caption_extension: str) -> tuple[list[ImageExample], list[Problem]]:
    if not root.is_dir():
        return [], [Problem("train_data_dir", "folder not found", value=str(root), fix="check the path")]
    examples: list[ImageExample] = []
    problems: list[Problem] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                       and not _hidden(p.relative_to(root))):
        repeats = _repeats_for(path, root)
        caption_file = path.with_suffix(caption_extension)
        if not caption_file.is_file():
            problems.append(Problem(str(path), "image has no caption file",
                                    fix=f"write its caption to {caption_file.name}"))
            continue
        try:
            caption = caption_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            problems.append(Problem(str(caption_file), f"caption file is unreadable: {e}", fix="save it as UTF-8 text"))
            continue
        examples.append(ImageExample(path, caption, repeats))
    return examples, problems


def _hidden(relative: Path) -> bool:
    """`.ipynb_checkpoints/`, `.cache/`, `._photo.png` (macOS): never training data."""
    return any(part.startswith(".") for part in relative.parts)


def _repeats_for(path: Path, root: Path) -> int:
    """kohya's convention: the first folder below the root named ``N_name`` gives N repeats (else 1)."""
    parts = path.relative_to(root).parts
    if len(parts) > 1 and (m := _REPEAT_DIR.match(parts[0])):
        return max(int(m.group(1)), 1)
    return 1


def _from_metadata(meta: Path, image_root: Path | None) -> tuple[list[ImageExample], list[Problem]]:
    if not meta.is_file():
        return [], [Problem("metadata_path", "file not found", value=str(meta), fix="check the path")]
    base = image_root if image_root is not None else meta.parent
    examples: list[ImageExample] = []
    problems: list[Problem] = []
    for lineno, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{meta}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(Problem(where, f"not valid JSON: {e.msg}", fix="one JSON object per line"))
            continue
        if not (isinstance(row, dict) and isinstance(row.get("file_name"), str) and isinstance(row.get("text"), str)):
            problems.append(Problem(where, "each line needs string fields `file_name` and `text`",
                                    value=row if not isinstance(row, dict) else sorted(row),
                                    fix='{"file_name": "cat.png", "text": "a photo of a cat"}'))
            continue
        path = base / row["file_name"]
        if not path.is_file():
            problems.append(Problem(where, "image file not found", value=str(path),
                                    fix=f"file_name is relative to {base}"))
            continue
        examples.append(ImageExample(path, row["text"].strip()))
    return examples, problems


def _check_image(path: Path) -> Problem | None:
    """Decode the whole image (``verify`` alone misses truncated files)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return Problem(str(path), f"image cannot be read: {e}",
                       fix="re-export the image or remove it (and its caption)")
    return None


def load_image(path: Path, resolution: int, *, center_crop: bool = True, flip: bool = False,
               rng: random.Random | None = None) -> np.ndarray:
    """Read an image as a float32 ``[3, resolution, resolution]`` array in [-1, 1] (the VAE's input range).

    The short side is resized to ``resolution`` (bicubic), then a square is cropped: in the center, or at a
    position drawn from ``rng``; ``flip`` mirrors it horizontally. EXIF rotation is applied first.
    """
    return load_image_with_geometry(path, resolution, center_crop=center_crop, flip=flip, rng=rng)[0]


def load_image_with_geometry(path: Path, resolution: int, *, center_crop: bool = True, flip: bool = False,
                             rng: random.Random | None = None) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """`load_image`, plus the original (height, width) and the crop's (top, left) in the resized image:
    SDXL is conditioned on both (Podell et al. 2023, "micro-conditioning")."""
    from PIL import Image, ImageOps

    rng = rng or random.Random(0)
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
    w, h = im.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    if center_crop:
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
    else:
        left, top = rng.randint(0, nw - resolution), rng.randint(0, nh - resolution)
    im = im.crop((left, top, left + resolution, top + resolution))
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = nw - resolution - left  # where the crop sits in the mirrored image
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0  # [H, W, 3] in [-1, 1]
    return np.ascontiguousarray(arr.transpose(2, 0, 1)), (h, w), (top, left)
