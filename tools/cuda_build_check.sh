#!/usr/bin/env bash
# Build mm1_kernels._C against a CUDA torch on a machine WITHOUT a GPU, and check what it
# registers. One command:
#
#     bash tools/cuda_build_check.sh            # venv in .venv-cuda (git-ignored), ~4.7 GB
#     VENV=/path/to/venv bash tools/cuda_build_check.sh   # reuse a venv that has torch==2.11.0
#
# What it proves: every .cu under csrc/ and csrc/torch_bindings.cpp compile and link into the
# extension with the GPU image's torch (2.11, CUDA 13.0; pinned, never resolved), the module
# imports without a GPU, every op that torch_bindings.cpp defines is registered with a CUDA
# kernel, and its Python fake gives output shapes under FakeTensorMode (torch.compile's view).
# It does not run a kernel (no GPU): the host emulation (tests/test_cuda_emulation*.py) and the
# GPU probe (bench/probe.py) do that. The build happens in a copy of the tree (a temp dir), so
# the working tree's own install is untouched. Needs nvcc (CUDA_HOME, default /usr/local/cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv="${VENV:-$root/.venv-cuda}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
if [ "$("$py" -c 'import torch; print(torch.__version__.split("+")[0], torch.version.cuda)' 2>/dev/null || true)" != "2.11.0 13.0" ]; then
  "$py" -m pip install -q "torch==2.11.0" numpy setuptools wheel ninja
fi
work=$(mktemp -d /tmp/mm1_cuda_build.XXXXXX)
trap 'rm -rf "$work"' EXIT
git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} cp --parents {} "$work/" 2>/dev/null || true
cd "$work"
start=$SECONDS
MM1_REQUIRE_CUDA_BUILD=1 MAX_JOBS="${MAX_JOBS:-2}" "$py" -m pip install -q --no-build-isolation --no-deps -e . \
  > "$work/build.log" 2>&1 || { tail -40 "$work/build.log"; echo "cuda_build_check: BUILD FAILED"; exit 1; }
echo "cuda_build_check: built in $((SECONDS - start)) s with $("$py" -c 'import torch; print("torch", torch.__version__)')"
cd /  # import the copy through its editable install, not the source tree of the caller
"$py" - "$work" <<'EOF'
import re
import sys
from pathlib import Path

import torch

import mm1_kernels
import mm1_kernels._C  # noqa: F401  (the extension: fails here if it does not load)

src = Path(sys.argv[1]) / "csrc" / "torch_bindings.cpp"
text = src.read_text()
defined = re.findall(r'm\.def\(\s*"([A-Za-z0-9_]+)\(', text)
assert defined, f"no m.def(...) found in {src}"
problems = []
for name in defined:
    handle = f"mm1::{name}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(handle, "CUDA"):
        problems.append(f"{handle}: no CUDA kernel registered")
    if torch._library.simple_registry.singleton.find(handle).fake_impl.kernel is None:
        problems.append(f"{handle}: no fake/meta implementation (torch.compile cannot trace it)")
print(f"cuda_build_check: mm1_kernels from {Path(mm1_kernels.__file__).parent}")
print(f"cuda_build_check: {len(defined)} ops defined in torch_bindings.cpp: {', '.join(defined)}")
if problems:
    print("\n".join(problems))
    sys.exit(1)
print("cuda_build_check: OK (each has a CUDA kernel and a fake)")
EOF
