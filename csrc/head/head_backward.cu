// FP32 head backward: the gradient w.r.t. the logits of one [rows x cols] block, recomputing
// the logits with the forward's logit_tile() (bitwise the forward's logits) and reading the
// saved per-token lse / entropy. Same formula as head_dlogits_kernel in
// mm1_kernels/head/triton_head.py (docs/m1_math.md §6):
//
//   p = exp(z - lse),  dz = [g_lp (onehot - p) + g_lse p - g_ent p (log p + H)] / temperature
//
// One 256-thread CTA per 64-row × 128-column tile; every element is written by exactly one
// thread and depends only on its own row's operands and statistics, so the block is bitwise
// reproducible and independent of the other rows. The two gradient GEMMs (dhidden += dz W,
// dweight += dz^T hidden) are formed by the caller block by block in a fixed order
// (mm1_kernels/head/backward.py), which keeps the scratch at one block, never [T, V].
#include "head/head_common.cuh"

namespace mm1 {
namespace head {
namespace {

struct DlogitsArgs {
  const void* hidden;
  const void* weight;
  const void* targets;
  int index_bytes;
  const float* g_lp;
  const float* g_lse;
  const float* g_ent;
  const float* lse;
  const float* entropy;
  float* dz;
  int64_t rows;
  int cols, K;
  int64_t vocab_offset;
  int64_t stride_h, stride_w, stride_dz;
  float inv_temp;
  bool vec;
};

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) head_dlogits_kernel(const DlogitsArgs a) {
  using L = TileLayout<T>;
  __shared__ __align__(16) uint32_t hs[L::H_WORDS];
  __shared__ __align__(16) uint32_t ws[L::W_WORDS];

  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kBT;
  const int c0 = blockIdx.y * kBV;
  const int rows_valid = static_cast<int>(min(a.rows - r0, static_cast<int64_t>(kBT)));
  const int cols_valid = min(kBV, a.cols - c0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int row0 = 16 * (warp % 4), col0 = 64 * (warp / 4);

  float z[kNT][4];
  logit_tile<T>(z, static_cast<const T*>(a.hidden) + r0 * a.stride_h, a.stride_h, rows_valid,
                static_cast<const T*>(a.weight) + c0 * a.stride_w, a.stride_w, cols_valid, a.K, a.vec,
                a.inv_temp, hs, ws);

#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int row = row0 + g + 8 * rr;
    if (row >= rows_valid) continue;
    const int64_t tr = r0 + row;
    const int64_t tgt = load_index(a.targets, a.index_bytes, tr);
    const float g_lp = tgt == kIgnoreIndex ? 0.f : a.g_lp[tr];  // an ignored logprob is a constant
    const float g_lse = a.g_lse[tr], g_ent = a.g_ent[tr], lse = a.lse[tr], ent = a.entropy[tr];
    float* out = a.dz + tr * a.stride_dz + c0;
#pragma unroll
    for (int ni = 0; ni < kNT; ++ni)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int col = col0 + ni * 8 + 2 * t + c;
        if (col >= cols_valid) continue;
        const float logp = z[ni][2 * rr + c] - lse;
        const float p = expf(logp);
        float gz = p * (g_lse - g_lp) - (g_ent * p) * (logp + ent);
        if (a.vocab_offset + c0 + col == tgt) gz += g_lp;
        out[col] = gz * a.inv_temp;
      }
  }
}

// ==== host code below: launchers and the C API (not emulated) ====

template <typename T>
cudaError_t launch_dlogits(const DlogitsArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.rows + kBT - 1) / kBT), static_cast<unsigned>((a.cols + kBV - 1) / kBV));
  head_dlogits_kernel<T><<<grid, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace
}  // namespace head
}  // namespace mm1

extern "C" MM1_API cudaError_t mm1_head_dlogits(
    mm1_dtype_t dtype, const void* hidden, const void* weight, const void* targets,
    int target_index_bytes, const float* g_lp, const float* g_lse, const float* g_ent,
    const float* lse, const float* entropy, float* dz, int64_t rows, int64_t cols,
    int64_t vocab_offset, int64_t hidden_dim, int64_t stride_h, int64_t stride_w,
    int64_t stride_dz, double temperature, cudaStream_t stream) {
  using namespace mm1::head;
  if (rows < 0 || cols < 0 || cols > 0x7fffffff - kBV || hidden_dim < 1 || hidden_dim > 0x7fffffff - kBK ||
      (rows + kBT - 1) / kBT > 0x7fffffff || (cols + kBV - 1) / kBV > 65535 || vocab_offset < 0 ||
      (target_index_bytes != 4 && target_index_bytes != 8) || !(temperature > 0.0) ||
      !(1.0 / temperature <= 3.4028234663852886e38))
    return cudaErrorInvalidValue;
  if (rows == 0 || cols == 0) return cudaSuccess;
  if (!hidden || !weight || !targets || !g_lp || !g_lse || !g_ent || !lse || !entropy || !dz ||
      stride_h < hidden_dim || stride_w < hidden_dim || stride_dz < cols)
    return cudaErrorInvalidValue;
  const size_t elem = dtype == MM1_DTYPE_FLOAT32 ? 4 : 2;
  if (!elem_aligned(hidden, elem) || !elem_aligned(weight, elem) || !elem_aligned(targets, target_index_bytes) ||
      !elem_aligned(g_lp, 4) || !elem_aligned(g_lse, 4) || !elem_aligned(g_ent, 4) || !elem_aligned(lse, 4) ||
      !elem_aligned(entropy, 4) || !elem_aligned(dz, 4))
    return cudaErrorInvalidValue;
  DlogitsArgs a{hidden, weight, targets, target_index_bytes, g_lp, g_lse, g_ent, lse, entropy, dz, rows,
                static_cast<int>(cols), static_cast<int>(hidden_dim), vocab_offset, stride_h, stride_w,
                stride_dz, static_cast<float>(1.0 / temperature),
                vec_ok(hidden, weight, hidden_dim, stride_h, stride_w, elem)};
  switch (dtype) {
    case MM1_DTYPE_FLOAT32: return launch_dlogits<float>(a, stream);
    case MM1_DTYPE_FLOAT16: return launch_dlogits<__half>(a, stream);
    case MM1_DTYPE_BFLOAT16: return launch_dlogits<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}
