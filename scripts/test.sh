#!/usr/bin/env bash
# The whole check, as CI runs it (.ci/run calls exactly this): install, lint, compile the CUDA
# sources (nvcc, object files only: CI has no GPU), build the C++ library with CMake, run pytest
# without the tests marked slow (a later -m in "$@" overrides it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
start=$SECONDS

bash scripts/install.sh --test

echo "[test] ruff"
"$PY" -m ruff check .

if command -v nvcc >/dev/null 2>&1 && [ -f scripts/compile_cuda.sh ]; then
  echo "[test] nvcc: compiling the CUDA sources for sm_80 and sm_90"
  bash scripts/compile_cuda.sh
else
  echo "[test] nvcc or scripts/compile_cuda.sh not found: CUDA compile check skipped"
fi

if command -v cmake >/dev/null 2>&1; then
  echo "[test] CMake: building the C++ op library and its smoke test"
  build=$(mktemp -d)
  prefix=$("$PY" -c "import torch; print(torch.utils.cmake_prefix_path)")
  generator=$(command -v ninja >/dev/null 2>&1 && echo "-GNinja" || true)
  cmake -S . -B "$build" $generator -DCMAKE_PREFIX_PATH="$prefix" -DPython_EXECUTABLE="$(command -v "$PY")" >"$build/configure.log" \
    || { cat "$build/configure.log"; exit 1; }
  cmake --build "$build" -j 2
  (cd "$build" && ctest --output-on-failure)
  rm -rf "$build"
fi

echo "[test] pytest (not slow: the slow tests run in scripts/gpu_check.sh)"
"$PY" -m pytest -q tests -m "not slow" "$@"
echo "[test] all passed in $((SECONDS - start)) s"
