#!/usr/bin/env bash
# The test suite on both Triton stacks a CPU machine must support (CI runs this through the
# README's test command):
#   1. the current environment on the GPU image's stack (triton 3.6, numpy < 2.3);
#   2. a fresh venv (.venv-newest, git-ignored) on the newest triton and numpy on the index.
# Each stage also runs the main job (`python -m mm1_model`: every backend, Triton through the
# interpreter).
# Extra arguments go to pytest on both stacks, e.g. `bash tools/test_stacks.sh -m "not slow"`.
# MM1_STACKS=gpu-image (or newest) runs one stack only. On a machine with a GPU the first stage
# tests the current environment with the Triton torch brought (compiled, GPU tests included)
# and the second is skipped: both stacks are interpreter stacks for CPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
stacks="${MM1_STACKS:-gpu-image newest}"
py="${PYTHON:-python}"
start=$SECONDS
for stack in $stacks; do
  case "$stack" in
    gpu-image)
      MM1_TRITON_STACK=gpu-image PYTHON="$py" bash tools/install.sh test
      echo "=== stack gpu-image: $("$py" -c 'import triton, numpy; print("triton", triton.__version__, "numpy", numpy.__version__)')"
      "$py" -m pytest tests -q "$@"
      "$py" -m mm1_model
      ;;
    newest)
      if [ "$("$py" -c "import torch; print(torch.cuda.is_available())" 2>/dev/null || true)" = True ]; then
        echo "=== stack newest: skipped (a GPU is present; this stack is a CPU interpreter check)"
        continue
      fi
      venv=.venv-newest
      [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
      MM1_TRITON_STACK=newest PYTHON="$venv/bin/python" bash tools/install.sh test
      echo "=== stack newest: $("$venv/bin/python" -c 'import triton, numpy; print("triton", triton.__version__, "numpy", numpy.__version__)')"
      "$venv/bin/python" -m pytest tests -q "$@"
      "$venv/bin/python" -m mm1_model
      ;;
    *) echo "unknown stack '$stack' (gpu-image | newest)" >&2; exit 2 ;;
  esac
  echo "=== stack $stack passed; $(( SECONDS - start )) s so far"
done
