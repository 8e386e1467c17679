#!/usr/bin/env bash
# Install mm1-kernels (editable) into the current Python environment without fighting torch.
#
#   bash tools/install.sh [EXTRAS]        e.g. `bash tools/install.sh test`, `... test,bench`
#
# Run it inside a virtual environment (python -m venv .venv && . .venv/bin/activate): it installs
# into whatever `python` is.
# - torch: kept if importable; otherwise torch==2.13.0 is installed (pinned: an unpinned torch
#   makes pip fetch whatever is newest, or replace the one an engine depends on). Which build
#   that is depends on the index: on this project's CPU machines and CI it is the CPU wheel on
#   disk; from PyPI on Linux it is the CUDA build (add --index-url
#   https://download.pytorch.org/whl/cpu yourself for a CPU-only wheel).
# - Triton and numpy: on a machine with a GPU, the Triton that torch brought is used (installing
#   another would fight torch's pin). Without a GPU our Triton kernels run through Triton's
#   interpreter, and MM1_TRITON_STACK picks which Triton that is (next to a CUDA build of torch
#   this replaces the Triton torch pinned, and pip says so: the interpreter is a test tool):
#     gpu-image (default)  triton 3.6 with numpy < 2.3, the stack of the GPU image we test on
#     newest               the newest triton and numpy on the index (what a current torch brings)
#     keep                 whatever is installed
# - the package itself with --no-build-isolation, so the build sees this torch (and builds the
#   CUDA extension when torch is a CUDA build; MM1_SKIP_CUDA_BUILD=1 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
stack="${MM1_TRITON_STACK:-gpu-image}"
py="${PYTHON:-python}"

if ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install "torch==2.13.0"
fi
if [ "$("$py" -c "import torch; print(torch.cuda.is_available())")" = True ]; then
  if ! "$py" -c "import triton" 2>/dev/null; then
    echo "note: this torch came without Triton; the triton backend will report itself" \
         "unavailable (install the Triton your torch pins to enable it)" >&2
  fi
else
  case "$stack" in
    gpu-image) "$py" -m pip install "triton==3.6.0" "numpy<2.3" ;;
    newest)    "$py" -m pip install --upgrade triton numpy ;;
    keep)      ;;
    *) echo "MM1_TRITON_STACK must be gpu-image, newest or keep (got '$stack')" >&2; exit 2 ;;
  esac
fi
"$py" -m pip install --no-build-isolation -e ".${extras:+[$extras]}"
"$py" -c "import torch, mm1_kernels; import importlib.util as u; \
print('mm1_kernels', mm1_kernels.__version__, '| torch', torch.__version__, \
'| triton', (__import__('triton').__version__ if u.find_spec('triton') else 'absent'), \
'| numpy', __import__('numpy').__version__)"
