// The MoE router: logits [T, E] -> top-k fp32 weights and int32 ids (mm1_kernels.moe_route).
//
// One warp per token: lane l holds columns l, l + 32, ... (VPL = ceil(E / 32) values, E <= 1024)
// in registers. Softmax in fp32 (max and sum reduced with xor shuffles, so every lane ends
// with the same values), then k rounds of a warp argmax whose order is "larger probability,
// then lower expert index": the lower expert wins a tie, deterministically, exactly as the
// reference's stable descending sort and the Triton kernel's min-index-among-maxima. Equal
// logits give bit-equal probabilities (the same operations on the same value), so ties in the
// logits stay ties. Each winner is masked (-1, below any probability) for the next round.
// Renormalizing divides by the sum of the k winners taken in slot order. A row with a NaN or
// +inf logit, or only -inf logits, has no softmax: ids 0..k-1 and NaN weights, as the
// reference (the NaN then reaches the MoE output instead of hiding behind a finite weight).
#include <cmath>

#include "moe/moe_common.cuh"

namespace mm1 {
namespace moe {
namespace {

constexpr int kRouteThreads = 256;
constexpr int kRouteWarps = kRouteThreads / 32;

struct RouteArgs {
  const void* logits;
  int64_t num_tokens;
  int64_t stride_t;
  int num_experts;
  int top_k;
  bool renormalize;
  float* weights;
  int32_t* ids;
};

template <typename T, int VPL>
__global__ void __launch_bounds__(kRouteThreads)
moe_route_kernel(const RouteArgs a) {
  const int lane = threadIdx.x % 32;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRouteWarps + threadIdx.x / 32;
  if (t >= a.num_tokens) return;  // warp-uniform: the shuffles below stay full-warp
  const T* row = static_cast<const T*>(a.logits) + t * a.stride_t;
  const int E = a.num_experts;

  float p[VPL];
  float mx = -INFINITY;
  int has_nan = 0;
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int c = lane + 32 * i;
    p[i] = c < E ? to_float(row[c]) : -INFINITY;
    has_nan |= p[i] != p[i];
    mx = fmaxf(mx, p[i]);  // fmaxf skips NaN: has_nan tracks it
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    has_nan |= __shfl_xor_sync(0xffffffffu, has_nan, off);
  }
  const bool bad = has_nan != 0 || mx == INFINITY || mx == -INFINITY;

  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    p[i] = lane + 32 * i < E ? expf(p[i] - mx) : 0.f;
    sum += p[i];
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
#pragma unroll
  for (int i = 0; i < VPL; ++i) p[i] = lane + 32 * i < E ? p[i] / sum : -1.f;  // -1: not selectable

  // Round j's winner is stored by lane j % 32, which rescales its own stores at the end (a
  // thread re-reading its own writes: no synchronization, no register array indexed by j).
  float* w_out = a.weights + t * a.top_k;
  int32_t* id_out = a.ids + t * a.top_k;
  float wsum = 0.f;  // the k winners summed in slot order (the same in every lane)
  for (int j = 0; j < a.top_k; ++j) {
    float bv = -INFINITY;
    int bi = 0x7fffffff;
#pragma unroll
    for (int i = 0; i < VPL; ++i)  // a lane's columns ascend with i: strict > keeps the lowest
      if (p[i] > bv) {
        bv = p[i];
        bi = lane + 32 * i;
      }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, off);
      if (ov > bv || (ov == bv && oi < bi)) {
        bv = ov;
        bi = oi;
      }
    }
#pragma unroll
    for (int i = 0; i < VPL; ++i)
      if (lane + 32 * i == bi) p[i] = -1.f;
    if (lane == j % 32) {
      w_out[j] = bv;
      id_out[j] = bad ? j : bi;
    }
    wsum += bv;
  }
  for (int j = lane; j < a.top_k; j += 32)
    w_out[j] = bad ? __int_as_float(0x7fc00000) : (a.renormalize ? w_out[j] / wsum : w_out[j]);
}

}  // namespace
}  // namespace moe
}  // namespace mm1

// ==== host code below: not emulated (tests/cuda_emulation/gen_moe.py cuts here) ====

namespace mm1 {
namespace moe {
namespace {

template <typename T, int VPL>
cudaError_t launch_route(const RouteArgs& a, cudaStream_t stream) {
  const int64_t blocks = (a.num_tokens + kRouteWarps - 1) / kRouteWarps;
  moe_route_kernel<T, VPL><<<static_cast<unsigned>(blocks), kRouteThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_route(const RouteArgs& a, cudaStream_t stream) {
  // Registers per lane grow with E: the smallest instantiation that holds the row.
  if (a.num_experts <= 32) return launch_route<T, 1>(a, stream);
  if (a.num_experts <= 64) return launch_route<T, 2>(a, stream);
  if (a.num_experts <= 128) return launch_route<T, 4>(a, stream);
  if (a.num_experts <= 256) return launch_route<T, 8>(a, stream);
  return launch_route<T, 32>(a, stream);
}

}  // namespace
}  // namespace moe
}  // namespace mm1

extern "C" MM1_API cudaError_t mm1_moe_route(mm1_dtype_t dtype, const void* logits, int64_t num_tokens,
                                             int64_t num_experts, int64_t stride_t, int top_k, int renormalize,
                                             float* topk_weights, int32_t* topk_ids, cudaStream_t stream) {
  using namespace mm1::moe;
  if (num_tokens < 0 || num_experts < 1 || num_experts > MM1_MOE_MAX_EXPERTS || top_k < 1 ||
      top_k > num_experts || (num_tokens + kRouteWarps - 1) / kRouteWarps > 0x7fffffff)
    return cudaErrorInvalidValue;
  if (num_tokens == 0) return cudaSuccess;
  if (!logits || !topk_weights || !topk_ids) return cudaErrorInvalidValue;
  // Scalar loads and stores: element-aligned pointers.
  const uintptr_t elem = dtype == MM1_DTYPE_FLOAT32 ? 4 : 2;
  if (reinterpret_cast<uintptr_t>(logits) % elem || reinterpret_cast<uintptr_t>(topk_weights) % 4 ||
      reinterpret_cast<uintptr_t>(topk_ids) % 4)
    return cudaErrorInvalidValue;
  const RouteArgs a{logits, num_tokens, stride_t, static_cast<int>(num_experts), top_k, renormalize != 0,
                    topk_weights, topk_ids};
  switch (dtype) {
    case MM1_DTYPE_FLOAT32: return dispatch_route<float>(a, stream);
    case MM1_DTYPE_FLOAT16: return dispatch_route<__half>(a, stream);
    case MM1_DTYPE_BFLOAT16: return dispatch_route<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}
