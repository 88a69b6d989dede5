#!/usr/bin/env bash
# Compile (not run: no GPU is needed or used) the CUDA build of the custom ops against a CUDA build of PyTorch,
# in a separate venv, so CUDA compile errors show up on a CPU-only machine. `make check-cuda` runs this.
#
#   CUDA_VENV=/work/cuda-venv        venv holding the CUDA torch (created if missing)
#   CUDA_TORCH_SPEC=torch==2.14.1    torch to install there (a CUDA 13 build)
#   CUDA_HOME=/usr/local/cuda        the toolkit root (not the prefix of an nvcc wrapper script)
#   TORCH_CUDA_ARCH_LIST='8.0;9.0'   GPU architectures to compile for
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CUDA_VENV:-/work/cuda-venv}"
TORCH_SPEC="${CUDA_TORCH_SPEC:-torch==2.14.1}"
PYTHON="${PYTHON:-python3}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"

if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
    echo "check-cuda: no nvcc at $CUDA_HOME/bin/nvcc; set CUDA_HOME to the CUDA toolkit root" >&2
    exit 2
fi
if ! "$VENV/bin/python" -c "import sys, torch; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
    echo "check-cuda: creating $VENV with $TORCH_SPEC (one-time, large download)..."
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q "$TORCH_SPEC" ninja numpy
fi

SITE="$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"
BUILD_DIR="$(mktemp -d "${TMPDIR:-/tmp}/check-cuda.XXXXXX")"
trap 'rm -rf "$BUILD_DIR"' EXIT

echo "check-cuda: torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'), $("$CUDA_HOME/bin/nvcc" --version | tail -1), archs $TORCH_CUDA_ARCH_LIST"
start=$(date +%s)
TOOLKIT_OPS_BUILD_DIR="$BUILD_DIR" PYTHONPATH="$REPO" EXTRA_INCLUDE="$SITE/nvidia/cu13/include" "$VENV/bin/python" - <<'PYEOF'
import glob
import os
import sys

from torch_utils import custom_ops
from torch_utils.ops import _plugin

custom_ops.verbosity = 'brief'
kwargs = _plugin.build_kwargs('cuda', extra_include_paths=[os.environ['EXTRA_INCLUDE']])
try:
    custom_ops.get_plugin(_plugin.MODULE_NAME, **kwargs)
except custom_ops.BuildError as e:
    log = open(e.log_path).read()[-8000:] if e.log_path else ''
    sys.exit(f'check-cuda: FAILED\n{e}\n{log}')

library, = glob.glob(os.path.join(os.environ['TOOLKIT_OPS_BUILD_DIR'], _plugin.MODULE_NAME + '-*', '*.so'))
with open(os.path.join(os.path.dirname(library), 'build.ninja')) as f:
    ninja = f.read()  # The nvcc command line that produced the (successfully linked and loaded) library.
wanted = ['code=sm_' + arch.replace('.', '') for arch in os.environ['TORCH_CUDA_ARCH_LIST'].split(';')]
missing = [flag for flag in wanted if flag not in ninja]
if missing or 'ops_cuda.cuda.o' not in ninja:
    sys.exit(f'check-cuda: FAILED: the build did not compile the CUDA kernels for {missing or wanted}')
print(f'check-cuda: built and loaded {library} (device code: {", ".join(w[5:] for w in wanted)})')
PYEOF
echo "check-cuda: PASSED in $(( $(date +%s) - start )) s"
