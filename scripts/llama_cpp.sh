#!/usr/bin/env bash
# Install llama.cpp's Python binding (the real GGUF consumer the export tests check against).
# The registry ships llama-cpp-python only as a source distribution, so the first run compiles llama.cpp with
# the system gcc/cmake (~8-10 minutes on 2 cores); the wheel is cached under $LORAFORGE_CACHE/wheels and every
# later run installs it in seconds. GGML_NATIVE=OFF: the cached wheel must run on any x86-64 CI machine.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
CACHE=${LORAFORGE_CACHE:-$HOME/.cache/loraforge}/wheels
PY=.venv/bin/python
if "$PY" -c "import llama_cpp" 2>/dev/null; then exit 0; fi
mkdir -p "$CACHE"
if ! ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $VERSION (one time, several minutes) into $CACHE"
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
    "$PY" -m pip wheel --quiet --no-deps --wheel-dir "$CACHE" "llama-cpp-python==$VERSION"
fi
"$PY" -m pip install --quiet -c scripts/constraints.txt "$CACHE"/llama_cpp_python-"$VERSION"-*.whl
