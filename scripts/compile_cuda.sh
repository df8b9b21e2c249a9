#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu to an object file with nvcc, for the architectures of
# csrc/build.json (sm_80, sm_90, and compute_90 PTX for newer GPUs), against the installed torch's
# headers: a CUDA compile error (or a warning in our code) fails CI on machines with no GPU and a
# CPU build of torch, since nothing is linked.
#   bash scripts/compile_cuda.sh   # VERBOSE=1 prints registers, spills and shared memory per kernel
# Environment: NVCC (default nvcc), PYTHON (default python3), EXTRA_NVCC_FLAGS.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nvcc="${NVCC:-nvcc}"
python="${PYTHON:-python3}"
command -v "$nvcc" >/dev/null || { echo "compile_cuda.sh: $nvcc not found (set NVCC)" >&2; exit 2; }

# torch's include dirs (as system headers, so their warnings stay theirs), the flags its
# CUDAExtension gives nvcc (-D__CUDA_NO_HALF_OPERATORS__ and friends, --expt-relaxed-constexpr),
# and ours from csrc/build.json (C++ standard, nvcc flags, architectures), as setup.py and CMake.
mapfile -t torch_flags < <("$python" -c '
import json, sys
from torch.utils import cpp_extension as c
build = json.load(open(sys.argv[1]))
for d in c.include_paths(): print(f"-isystem={d}")
print(*c.COMMON_NVCC_FLAGS, sep="\n")
print("-std=c++" + str(build["cxx_standard"]), *build["nvcc_flags"], sep="\n")
for a in build["cuda_archs"]:  # "9.0+PTX": SASS for sm_90 and PTX for newer GPUs
    sm = a.removesuffix("+PTX").replace(".", "")
    code = f"[sm_{sm},compute_{sm}]" if a.endswith("+PTX") else f"sm_{sm}"
    print(f"-gencode=arch=compute_{sm},code={code}")
' "$root/csrc/build.json")
((${#torch_flags[@]})) || { echo "compile_cuda.sh: cannot import torch with $python" >&2; exit 2; }

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
# The CPU wheel lacks c10/cuda/impl/cuda_cmake_macros.h: C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips it.
flags=(-DMVIT2_WITH_CUDA -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE
  -Xcompiler=-Wall,-Wextra,-Werror -Werror=all-warnings
  "${torch_flags[@]}")
[[ "${VERBOSE:-0}" == 1 ]] && flags+=(--resource-usage)
# shellcheck disable=SC2206  # EXTRA_NVCC_FLAGS is a space-separated list on purpose
flags+=(${EXTRA_NVCC_FLAGS:-})

shopt -s nullglob
sources=("$root"/csrc/cuda/*.cu)
((${#sources[@]})) || { echo "compile_cuda.sh: no csrc/cuda/*.cu found" >&2; exit 1; }
start=$SECONDS
for src in "${sources[@]}"; do
  t0=$SECONDS
  "$nvcc" "${flags[@]}" -c "$src" -o "$out/$(basename "${src%.cu}").o"
  echo "compiled ${src#"$root"/} in $((SECONDS - t0)) s"
done
echo "compile_cuda.sh: ${#sources[@]} file(s) OK in $((SECONDS - start)) s" \
  "($("$nvcc" --version | tail -1))"
