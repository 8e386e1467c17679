#!/usr/bin/env bash
# Everything a GPU session should run, in stages that each fit the device tool's 10-minute
# command limit. Usage, from the repository root on the GPU machine:
#   bash bench/gpu_session.sh build      # build the extension (fatal on failure), import check
#   bash bench/gpu_session.sh tests      # the whole test suite, compiled (GPU tests included)
#   bash bench/gpu_session.sh lightning  # benchmarks, one op per call: lightning | moe | head | model
#   bash bench/gpu_session.sh profiles   # one Nsight Compute profile per op
# Logs and results go to $OUT (the device tool's return folder) when set, else bench/results/.
#
# The GPU image has torch, triton and pytest but no package registry, and may lack safetensors
# (the model's checkpoints), tqdm and matplotlib (the report). Fetch them here first, into the
# git-ignored .wheels/ (~25 MB, under the device tool's 64 MiB carry limit), and pass
# carry=[".wheels"]; the build stage installs them offline:
#   pip download safetensors tqdm matplotlib --python-version 3.12 --only-binary=:all: \
#       --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --no-deps -d .wheels
#   (plus matplotlib's own dependencies: contourpy cycler fonttools kiwisolver pillow pyparsing
#    python-dateutil six, the same way)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
stage="${1:?stage: build | tests | lightning | moe | head | model | profiles}"
case "$stage" in
  build)
    if [ -d .wheels ]; then
      pip install --no-index --find-links .wheels safetensors tqdm matplotlib 2>&1 | tail -3
    fi
    MM1_REQUIRE_CUDA_BUILD=1 pip install --no-build-isolation --no-deps -e . 2>&1 | tail -20
    python -c "import torch, mm1_kernels as mk, mm1_kernels._C; print(torch.__version__, torch.cuda.get_device_name(), torch.ops.mm1.lightning_decode_cuda)"
    ;;
  tests)
    python -m pytest tests -q -rs 2>&1 | tee "$out/gpu_tests.log" | tail -40
    ;;
  lightning|moe|head|model)
    python -m bench "$stage" --out "$out" --no-progress 2>&1 | tee "$out/bench_$stage.log"
    [ "$stage" = moe ] && python -m bench moe --tp 8 --out "$out" --no-progress 2>&1 | tee -a "$out/bench_moe.log"
    python -m bench.report "$out" --out "$out/report" >/dev/null
    ;;
  profiles)
    python -m profiles.run_ncu lightning prefill --param T=32768 --impl triton
    python -m profiles.run_ncu lightning decode --param B=256 --impl cuda
    python -m profiles.run_ncu moe decode --param T=1 --param dtype=int8
    python -m profiles.run_ncu head logprobs --param T=8192
    ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
