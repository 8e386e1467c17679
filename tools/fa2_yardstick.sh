#!/usr/bin/env bash
# The FlashAttention-2 yardstick of profiles/static (the CUDA prefill's instructions
# per MMA "within 2× of a well-formed FA2-style loop"): compiles FA2's forward kernel for
# sm_90a and writes profiles/static/yardstick.json, which `python -m profiles.static` reads for
# the "÷ FA2" column of its chunk-loop table. Run by hand; CI and the report only read the JSON.
#
#     bash tools/fa2_yardstick.sh FLASH_ATTENTION_GIT_DIR CUTLASS_GIT_DIR [OUT_JSON]
#
# FLASH_ATTENTION_GIT_DIR: a clone (or bare mirror) of github.com/Dao-AILab/flash-attention;
# FA_COMMIT (default: its HEAD) picks the commit. CUTLASS_GIT_DIR: a clone of
# github.com/NVIDIA/cutlass that has the commit flash-attention's csrc/cutlass submodule pins at
# FA_COMMIT (read with git ls-tree; nothing else is used). The committed figures came from
#   flash-attention 0251105a2fb19d2957484b7f023cd8c115286ced, cutlass 7127592069c2fe01b041e174ba4345ef9b279671
# with nvcc 13.0 (V13.0.88). Needs nvcc (CUDA_HOME, default /usr/local/cuda), the headers of a
# CUDA build of torch (FA2's launch template includes c10/cuda and ATen/cuda; a CPU wheel lacks
# c10/cuda/impl/cuda_cmake_macros.h): TORCH_INCLUDE=.../site-packages/torch/include, or a PYTHON
# whose torch is a CUDA build; and a PYTHON (default python3) that can run this repo's
# profiles/static (with triton, for its cuobjdump, or cuobjdump under CUDA_HOME).
#
# What is compiled: a translation unit that takes the addresses of the flash_fwd_kernel
# instantiations run_mha_fwd_hdim128<cutlass::bfloat16_t> launches without dropout at even
# sequence lengths (Flash_fwd_kernel_traits<128, 128, 64, 4> non-causal and causal on sm80/sm90,
# <128, 64, 64, 4> causal on sm86/sm89), with FA2's own nvcc flags (its setup.py) for
# sm_90a. One nvcc process, one thread: 1-2 minutes.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 2
fi
fa=$1 cutlass=$2
cd "$(dirname "$0")/.."
root=$PWD
out=${3:-$root/profiles/static/yardstick.json}
nvcc="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
py=${PYTHON:-python3}
fa_commit=$(git -C "$fa" rev-parse "${FA_COMMIT:-HEAD}^{commit}")
cutlass_commit=$(git -C "$fa" ls-tree "$fa_commit" csrc/cutlass | awk '$2 == "commit" {print $3}')
[ -n "$cutlass_commit" ] || { echo "no csrc/cutlass submodule at $fa_commit" >&2; exit 1; }
torch_include=${TORCH_INCLUDE:-$("$py" -c 'from torch.utils.cpp_extension import include_paths; print(include_paths()[0])')}

work=$(mktemp -d /tmp/fa2_yardstick.XXXXXX)
trap 'rm -rf "$work"' EXIT
git -C "$fa" archive "$fa_commit" csrc/flash_attn/src | tar -x -C "$work"
mkdir -p "$work/cutlass"
git -C "$cutlass" archive "$cutlass_commit" include | tar -x -C "$work/cutlass"

cat > "$work/fa2_hdim128_bf16.cu" <<'EOF'
// The forward kernels FA2 launches for head dim 128, bf16, no dropout, even sequence lengths
// (run_mha_fwd_hdim128 / run_flash_fwd: Is_local = Has_alibi = Is_softcap = Return_softmax =
// false, Is_even_MN = Is_even_K = true). Taking a kernel's address instantiates its device code.
#include "namespace_config.h"
#include "flash_fwd_launch_template.h"
namespace FLASH_NAMESPACE {
using Sm90 = Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, cutlass::bfloat16_t>;
using Sm8xCausal = Flash_fwd_kernel_traits<128, 64, 64, 4, false, false, cutlass::bfloat16_t>;
void* yardstick_kernels[] = {
    (void*)&flash_fwd_kernel<Sm90, false, false, false, false, true, true, false, false>,
    (void*)&flash_fwd_kernel<Sm90, false, true, false, false, true, true, false, false>,
    (void*)&flash_fwd_kernel<Sm8xCausal, false, true, false, false, true, true, false, false>,
};
}  // namespace FLASH_NAMESPACE
EOF

# FA2's setup.py nvcc flags (cc_flag aside), for sm_90a.
flags="-O3 -std=c++17 -U__CUDA_NO_HALF_OPERATORS__ -U__CUDA_NO_HALF_CONVERSIONS__ -U__CUDA_NO_HALF2_OPERATORS__ -U__CUDA_NO_BFLOAT16_CONVERSIONS__ --expt-relaxed-constexpr --expt-extended-lambda --use_fast_math -gencode=arch=compute_90a,code=sm_90a"
src=$work/csrc/flash_attn
# shellcheck disable=SC2086
"$nvcc" $flags -t 1 -Xptxas -v -I"$src" -I"$src/src" -I"$work/cutlass/include" -I"$torch_include" \
  -cubin "$work/fa2_hdim128_bf16.cu" -o "$work/fa2.cubin" 2> "$work/ptxas.txt" || { cat "$work/ptxas.txt" >&2; exit 1; }
cuobjdump=$("$py" -c 'from profiles.static.aot import _tool; print(_tool("cuobjdump"))' 2>/dev/null || echo "${CUDA_HOME:-/usr/local/cuda}/bin/cuobjdump")
"$cuobjdump" -sass "$work/fa2.cubin" > "$work/fa2.sass"
"$py" -m profiles.static.yardstick --sass "$work/fa2.sass" --ptxas-log "$work/ptxas.txt" --out "$out" \
  --flash-attention-commit "$fa_commit" --cutlass-commit "$cutlass_commit" --nvcc "$nvcc" --nvcc-flags "$flags"
