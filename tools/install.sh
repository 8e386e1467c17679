#!/usr/bin/env bash
# Install mm1-kernels (editable) into the current Python environment without fighting torch.
#
#   bash tools/install.sh [EXTRAS]        e.g. `bash tools/install.sh test`, `... test,bench`
#
# - torch: kept if importable; otherwise torch==2.13.0 is installed (pinned: an unpinned torch
#   makes pip fetch a multi-GB CUDA build, or replace the one an engine depends on).
# - Triton and numpy: a CUDA torch brought the Triton it was built against, and that one is
#   used (installing another would fight torch's pin). A CPU torch runs our Triton kernels
#   through Triton's interpreter; MM1_TRITON_STACK picks which Triton the interpreter is:
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
torch_cuda=$("$py" -c "import torch; print(torch.version.cuda or '')")
if [ -n "$torch_cuda" ]; then
  if ! "$py" -c "import triton" 2>/dev/null; then
    echo "note: this CUDA torch ($torch_cuda) came without Triton; the triton backend will report" \
         "itself unavailable (install the Triton your torch pins to enable it)" >&2
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
