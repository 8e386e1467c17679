// FP32 head forward: per-split statistics on tensor cores, then a fixed-order merge.
//
// Same math as mm1_kernels/head/triton_head.py. head_stats_kernel: one 256-thread CTA per
// (64-token tile, vocabulary split of MM1_HEAD_SPLIT_V ids) walks its split 128 ids at a time;
// each [64 x 128] logits tile comes from logit_tile() (head_common.cuh) and is folded into
// four running fp32 statistics per token and thread:
//
//     m = max z,   s = Σ exp(z - m),   u = Σ exp(z - m)·(z - m),   t = z[target] (else 0)
//
// rescaled when m grows (α = exp(m_old - m): s ← α s, u ← α (u + (m_old - m) s_old)). At the
// end of the split the 4 lanes sharing a row and then the 2 warps sharing it (column halves)
// are combined in a fixed order, and the split's (m, s, u, t) per token go to the workspace
// [nsplit, 4, T]. head_merge_kernel combines the splits of each token in split order:
// M = max m_i, S = Σ s_i e^{m_i - M}, U = Σ e^{m_i - M} (u_i + (m_i - M) s_i), and
//
//     lse = M + log S,   logprob = (t - M) - log S,   entropy = log S - U / S.
//
// Determinism and batch invariance: tiles, the split size and every combination order are
// constants; a token's statistics depend only on its own row of each MMA (an MMA row depends
// only on that row's operands) and no result is accumulated with atomics. The launch order
// (kGroupT token tiles fastest, then the split, as the Triton kernel) changes when a CTA runs,
// never what it computes.
//
// Memory: the workspace is 16 bytes per token per split (98 splits at V = 200,064: 1.6 KB per
// token), never a logit unless the caller asks for them (logits != NULL, for sampling).
#include "head/head_common.cuh"

namespace mm1 {
namespace head {
namespace {

struct StatsArgs {
  const void* hidden;
  const void* weight;
  const void* targets;
  int index_bytes;
  float* partials;  // [nsplit, 4, T]
  float* logits;    // NULL or [T, V] with row stride stride_logits
  int64_t tokens;
  int vocab, K;
  int64_t stride_h, stride_w, stride_logits;
  float inv_temp;
  int split_v, nsplit;
  bool vec;
};

// (m, s, u, t) ← (m, s, u, t) ⊕ (m2, s2, u2, t2): the statistics of the union of two column sets.
__device__ __forceinline__ void combine(float& m, float& s, float& u, float& tl, float m2, float s2, float u2,
                                        float t2) {
  const float M = fmaxf(m, m2);
  const float a1 = expf(m - M), a2 = expf(m2 - M);
  u = a1 * (u + (m - M) * s) + a2 * (u2 + (m2 - M) * s2);
  s = a1 * s + a2 * s2;
  m = M;
  tl += t2;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) head_stats_kernel(const StatsArgs a) {
  using L = TileLayout<T>;
  __shared__ __align__(16) uint32_t hs[L::H_WORDS];
  __shared__ __align__(16) uint32_t ws[L::W_WORDS];
  __shared__ float red_s[2][kBT][4];  // per column half: (m, s, u, t) of each row

  // Grouped launch order: kGroupT token tiles fastest, then the split.
  const int64_t pid = blockIdx.x;
  const int64_t tiles_t = (a.tokens + kBT - 1) / kBT;
  const int64_t per_group = static_cast<int64_t>(kGroupT) * a.nsplit;
  const int64_t first_t = (pid / per_group) * kGroupT;
  const int64_t group_size = min(tiles_t - first_t, static_cast<int64_t>(kGroupT));
  const int64_t tile_t = first_t + (pid % per_group) % group_size;
  const int split = static_cast<int>((pid % per_group) / group_size);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int row0 = 16 * (warp % 4), col0 = 64 * (warp / 4);
  const int64_t t0 = tile_t * kBT;
  const int rows_valid = static_cast<int>(min(a.tokens - t0, static_cast<int64_t>(kBT)));
  const int v_start = split * a.split_v;
  const int v_end = min(v_start + a.split_v, a.vocab);

  // This thread's two rows: row0 + g and row0 + g + 8 (fragment registers r = 0, 1 and 2, 3).
  int64_t tgt[2];
  float m[2], s[2], u[2], tl[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int row = row0 + g + 8 * rr;
    tgt[rr] = row < rows_valid ? load_index(a.targets, a.index_bytes, t0 + row) : -1;
    m[rr] = kNegBig;
    s[rr] = u[rr] = tl[rr] = 0.f;
  }

  const T* h = static_cast<const T*>(a.hidden) + t0 * a.stride_h;
  for (int v0 = v_start; v0 < v_end; v0 += kBV) {
    const int cols_valid = min(kBV, v_end - v0);
    float z[kNT][4];
    logit_tile<T>(z, h, a.stride_h, rows_valid, static_cast<const T*>(a.weight) + v0 * a.stride_w, a.stride_w,
                  cols_valid, a.K, a.vec, a.inv_temp, hs, ws);
    if (a.logits) {
#pragma unroll
      for (int ni = 0; ni < kNT; ++ni)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int row = row0 + g + (r >= 2 ? 8 : 0), col = col0 + ni * 8 + 2 * t + (r & 1);
          if (row < rows_valid && col < cols_valid) a.logits[(t0 + row) * a.stride_logits + v0 + col] = z[ni][r];
        }
    }
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float mx = m[rr];
#pragma unroll
      for (int ni = 0; ni < kNT; ++ni)
#pragma unroll
        for (int c = 0; c < 2; ++c)
          if (col0 + ni * 8 + 2 * t + c < cols_valid) mx = fmaxf(mx, z[ni][2 * rr + c]);
      float se = 0.f, sed = 0.f;
#pragma unroll
      for (int ni = 0; ni < kNT; ++ni)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int col = col0 + ni * 8 + 2 * t + c;
          if (col < cols_valid) {
            const float zv = z[ni][2 * rr + c];
            const float d = zv - mx;
            const float e = expf(d);
            se += e;
            sed += e * d;
            if (v0 + col == tgt[rr]) tl[rr] += zv;
          }
        }
      const float alpha = expf(m[rr] - mx);
      u[rr] = alpha * (u[rr] + (m[rr] - mx) * s[rr]) + sed;
      s[rr] = alpha * s[rr] + se;
      m[rr] = mx;
    }
  }

  // Lanes t = 0..3 of a row: butterfly, then lane t == 0 holds the row's half (fixed order).
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m[rr], off);
      const float s2 = __shfl_xor_sync(0xffffffffu, s[rr], off);
      const float u2 = __shfl_xor_sync(0xffffffffu, u[rr], off);
      const float t2 = __shfl_xor_sync(0xffffffffu, tl[rr], off);
      combine(m[rr], s[rr], u[rr], tl[rr], m2, s2, u2, t2);
    }
    if (t == 0) {
      float* dst = red_s[warp / 4][row0 + g + 8 * rr];
      dst[0] = m[rr];
      dst[1] = s[rr];
      dst[2] = u[rr];
      dst[3] = tl[rr];
    }
  }
  __syncthreads();
  if (threadIdx.x < rows_valid) {  // column half 0, then half 1
    const int row = threadIdx.x;
    float M = red_s[0][row][0], S = red_s[0][row][1], U = red_s[0][row][2], Tl = red_s[0][row][3];
    combine(M, S, U, Tl, red_s[1][row][0], red_s[1][row][1], red_s[1][row][2], red_s[1][row][3]);
    float* base = a.partials + static_cast<int64_t>(split) * 4 * a.tokens + t0 + row;
    base[0] = M;
    base[a.tokens] = S;
    base[2 * a.tokens] = U;
    base[3 * a.tokens] = Tl;
  }
}

constexpr int kMergeThreads = 256;

// One thread per token: the splits in index order (the order is part of the result).
__global__ void __launch_bounds__(kMergeThreads) head_merge_kernel(const float* partials, const void* targets,
                                                                   int index_bytes, float* logprobs, float* lse,
                                                                   float* entropy, int64_t tokens, int nsplit) {
  const int64_t tok = static_cast<int64_t>(blockIdx.x) * kMergeThreads + threadIdx.x;
  if (tok >= tokens) return;
  const float* base = partials + tok;
  float M = kNegBig;
  for (int i = 0; i < nsplit; ++i) M = fmaxf(M, base[static_cast<int64_t>(i) * 4 * tokens]);
  float S = 0.f, U = 0.f, Tl = 0.f;
  for (int i = 0; i < nsplit; ++i) {
    const float* p = base + static_cast<int64_t>(i) * 4 * tokens;
    const float m_i = p[0], s_i = p[tokens], u_i = p[2 * tokens];
    Tl += p[3 * tokens];
    const float scale = expf(m_i - M);
    S += scale * s_i;
    U += scale * (u_i + (m_i - M) * s_i);
  }
  const float log_s = logf(S);
  const int64_t tgt = load_index(targets, index_bytes, tok);
  logprobs[tok] = tgt == kIgnoreIndex ? 0.f : (Tl - M) - log_s;
  lse[tok] = M + log_s;
  entropy[tok] = log_s - U / S;
}

// ==== host code below: launchers and the C API (not emulated) ====

template <typename T>
cudaError_t launch_forward(const StatsArgs& a, float* logprobs, float* lse, float* entropy, cudaStream_t stream) {
  const int64_t blocks = (a.tokens + kBT - 1) / kBT * a.nsplit;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  head_stats_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t mblocks = (a.tokens + kMergeThreads - 1) / kMergeThreads;
  head_merge_kernel<<<static_cast<unsigned>(mblocks), kMergeThreads, 0, stream>>>(
      a.partials, a.targets, a.index_bytes, logprobs, lse, entropy, a.tokens, a.nsplit);
  return cudaGetLastError();
}

}  // namespace
}  // namespace head
}  // namespace mm1

extern "C" MM1_API int64_t mm1_head_num_splits(int64_t vocab) {
  return vocab <= 0 ? 0 : (vocab + MM1_HEAD_SPLIT_V - 1) / MM1_HEAD_SPLIT_V;
}

extern "C" MM1_API size_t mm1_head_workspace_bytes(int64_t tokens, int64_t vocab) {
  if (tokens <= 0 || vocab <= 0) return 0;
  return static_cast<size_t>(mm1_head_num_splits(vocab)) * 4 * static_cast<size_t>(tokens) * sizeof(float);
}

extern "C" MM1_API cudaError_t mm1_head_forward(
    mm1_dtype_t dtype, const void* hidden, const void* weight, const void* targets,
    int target_index_bytes, float* workspace, float* logprobs, float* lse, float* entropy,
    float* logits, int64_t tokens, int64_t vocab, int64_t hidden_dim,
    int64_t stride_h, int64_t stride_w, int64_t stride_logits, double temperature,
    cudaStream_t stream) {
  using namespace mm1::head;
  // vocab and K are int inside the kernels; V + SPLIT_V must not overflow either.
  if (tokens < 0 || vocab < 1 || vocab > 0x7fffffff - MM1_HEAD_SPLIT_V || hidden_dim < 1 ||
      hidden_dim > 0x7fffffff - kBK || (target_index_bytes != 4 && target_index_bytes != 8) ||
      !(temperature > 0.0) || !(1.0 / temperature <= 3.4028234663852886e38))
    return cudaErrorInvalidValue;
  if (tokens == 0) return cudaSuccess;
  if (!hidden || !weight || !targets || !workspace || !logprobs || !lse || !entropy ||
      stride_h < hidden_dim || stride_w < hidden_dim || (logits && stride_logits < vocab))
    return cudaErrorInvalidValue;
  const size_t elem = dtype == MM1_DTYPE_FLOAT32 ? 4 : 2;
  if (!elem_aligned(hidden, elem) || !elem_aligned(weight, elem) || !elem_aligned(targets, target_index_bytes) ||
      !elem_aligned(workspace, 4) || !elem_aligned(logprobs, 4) || !elem_aligned(lse, 4) ||
      !elem_aligned(entropy, 4) || !elem_aligned(logits, 4))
    return cudaErrorInvalidValue;
  StatsArgs a{hidden, weight, targets, target_index_bytes, workspace, logits, tokens,
              static_cast<int>(vocab), static_cast<int>(hidden_dim), stride_h, stride_w, stride_logits,
              static_cast<float>(1.0 / temperature), MM1_HEAD_SPLIT_V,
              static_cast<int>(mm1_head_num_splits(vocab)),
              vec_ok(hidden, weight, hidden_dim, stride_h, stride_w, elem)};
  switch (dtype) {
    case MM1_DTYPE_FLOAT32: return launch_forward<float>(a, logprobs, lse, entropy, stream);
    case MM1_DTYPE_FLOAT16: return launch_forward<__half>(a, logprobs, lse, entropy, stream);
    case MM1_DTYPE_BFLOAT16: return launch_forward<__nv_bfloat16>(a, logprobs, lse, entropy, stream);
  }
  return cudaErrorInvalidValue;
}
