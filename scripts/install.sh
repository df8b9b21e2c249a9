#!/usr/bin/env bash
# Installs mvit2_kernels into the current Python environment and builds its extension.
#
#   bash scripts/install.sh          # the package (CPU kernels; CUDA kernels where CUDA is there)
#   bash scripts/install.sh --test   # ... plus what the tests need
#
# An installed torch is kept as it is. Only where there is none does this install torch==2.13.0
# (the CPU wheel on our CPU machines): a bare `pip install torch` would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
pip() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[install] no torch in this environment: installing torch==2.13.0"
  pip torch==2.13.0
fi
torch_version=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
echo "[install] torch ${torch_version} (kept as installed)"

# Triton must be the release this torch was built against; a newer one can break torch.compile.
if ! "$PY" -c "import triton" 2>/dev/null; then
  case "$torch_version" in
    2.13.*) pip triton==3.7.1 ;;
    2.11.*) pip triton==3.6.0 ;;
    *) echo "[install] no triton pin known for torch ${torch_version}: pip will pick one" ;;
  esac
fi

# --no-build-isolation: build against the torch above instead of downloading another one.
pip setuptools wheel pybind11 ninja
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
pip --no-build-isolation -e ".${extras}"
"$PY" -c "import mvit2_kernels as m; print('[install] mvit2_kernels', m.__version__, 'backends:', m.available_backends())"
