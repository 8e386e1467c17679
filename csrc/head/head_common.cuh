// Device code shared by the head kernels: the fixed tiles, the bf16/fp16 tensor-core MMA
// (mma.sync m16n8k16, fp32 accumulators), the exact 3-way bf16 split of fp32 operands, and
// the one function that computes a [64 x 128] tile of fp32 logits. The forward statistics,
// the logits the forward can store and the backward's logit gradients all come from
// logit_tile(), so they use bitwise the same logits.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "head/head.h"

namespace mm1 {
namespace head {

// Tiles: constants, never chosen from T (batch invariance). A CTA of 8 warps owns kBT tokens
// × kBV vocabulary ids; warp w computes rows 16·(w % 4) .. +16 and columns 64·(w / 4) .. +64
// (8 MMA n-tiles), summing K in kBK-wide blocks.
constexpr int kBT = 64;
constexpr int kBV = 128;
constexpr int kBK = 32;
constexpr int kThreads = 256;
constexpr int kNT = 8;  // 8-wide MMA column tiles per warp
// Token tiles per launch group of the forward (the program order; see head_forward.cu).
constexpr int kGroupT = 8;
// Far below any logit, finite: (m_old - m_new) · s_old stays 0 instead of NaN.
constexpr float kNegBig = -3.0e38f;
constexpr int kIgnoreIndex = -100;
static_assert(MM1_HEAD_SPLIT_V % kBV == 0, "a split is a whole number of vocabulary tiles");

// Shared-memory tiles in 32-bit words: a row of kBK elements is 16 words (16-bit inputs) or
// 32 words (fp32), padded so that a fragment load hits 32 distinct banks: 16-bit tiles are read
// one word per lane at row g, word t (stride 20 ≡ 20 mod 32: g·20 + t covers 32 banks), fp32
// tiles two words per lane (64-bit loads, served per half-warp: stride 40 ≡ 8 mod 32, so
// g·8 + 2t + {0, 1} covers 32 banks for g < 4). Row starts stay 16-byte aligned.
template <typename T> struct TileLayout {
  static constexpr int WORDS = kBK * static_cast<int>(sizeof(T)) / 4;
  static constexpr int STRIDE = WORDS + (sizeof(T) == 4 ? 8 : 4);
  static constexpr int H_WORDS = kBT * STRIDE;
  static constexpr int W_WORDS = kBV * STRIDE;
};

// ---- tensor-core MMA, m16n8k16, fp32 accumulators -------------------------------------------
// Fragment layouts (g = lane / 4, t = lane % 4; each 32-bit register holds two 16-bit values,
// the lower column index in the low half):
//   A 16x16 row-major: a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B 16x8 (k x n):    b0 (k = 2t..2t+1, n = g), b1 (k = 2t+8..2t+9, n = g)
//   C 16x8:            c0 (g, 2t), c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1)
// bf16 × bf16 and fp16 × fp16 products are exact in fp32; only the accumulation rounds.

__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void mma_f16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// fp32 operands: x = x0 + x1 + x2 EXACTLY, each a bf16 (round to nearest peels 8 significant
// bits and the sign of the remainder; x - x0 and x1's remainder are exact fp32 subtractions,
// and the last remainder has at most 8 significant bits). A product x·y is then the six
// exact bf16 products with i + j <= 2; the three dropped ones (x1y2, x2y1, x2y2) are below
// 2^-23 |x y| together, about one fp32 rounding. (3xTF32 keeps ~21 bits per product: several
// fp32 roundings.) Six MMAs per product on tensor cores should still beat IEEE fp32 on CUDA
// cores (~15x slower per FLOP than bf16 tensor cores on an H100); unmeasured.
__device__ __forceinline__ uint32_t pack_bf16(__nv_bfloat162 v) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(v.x)) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(v.y)) << 16);
}

__device__ __forceinline__ void split3(float x, float y, uint32_t& p0, uint32_t& p1, uint32_t& p2) {
  const __nv_bfloat162 h0 = __floats2bfloat162_rn(x, y);
  const float rx = x - __low2float(h0), ry = y - __high2float(h0);
  const __nv_bfloat162 h1 = __floats2bfloat162_rn(rx, ry);
  const __nv_bfloat162 h2 = __floats2bfloat162_rn(rx - __low2float(h1), ry - __high2float(h1));
  p0 = pack_bf16(h0);
  p1 = pack_bf16(h1);
  p2 = pack_bf16(h2);
}

// Element i of an int32 or int64 index array, widened to 64 bits.
__device__ __forceinline__ int64_t load_index(const void* p, int index_bytes, int64_t i) {
  return index_bytes == 8 ? static_cast<const int64_t*>(p)[i]
                          : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
}

// A zero element, without T(float): torch's extension build defines __CUDA_NO_HALF_CONVERSIONS__
// and __CUDA_NO_BFLOAT16_CONVERSIONS__, which remove those constructors.
template <typename T> __device__ __forceinline__ T zero_elem();
template <> __device__ __forceinline__ float zero_elem<float>() { return 0.f; }
template <> __device__ __forceinline__ __half zero_elem<__half>() { return __float2half_rn(0.f); }
template <> __device__ __forceinline__ __nv_bfloat16 zero_elem<__nv_bfloat16>() { return __float2bfloat16_rn(0.f); }

// Stage rows [0, rows_valid) × elements [0, k_valid) of src (row stride `stride` elements) into
// the tile dst[ROWS][STRIDE words]; everything else is zero (masked rows and the K tail add 0
// to every logit). vec: K, the strides and the pointer allow 16-byte loads.
template <typename T, int ROWS>
__device__ __forceinline__ void load_tile(uint32_t* dst, const T* src, int64_t stride, int rows_valid,
                                          int k_valid, bool vec) {
  using L = TileLayout<T>;
  constexpr int PER_VEC = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte load
  constexpr int VECS = kBK / PER_VEC;                        // 16-byte loads per row
  if (vec) {  // k_valid is then a multiple of PER_VEC
    for (int idx = threadIdx.x; idx < ROWS * VECS; idx += kThreads) {
      const int r = idx / VECS, c = (idx - r * VECS) * PER_VEC;
      uint4 x = make_uint4(0u, 0u, 0u, 0u);
      if (r < rows_valid && c < k_valid) x = *reinterpret_cast<const uint4*>(src + r * stride + c);
      *reinterpret_cast<uint4*>(dst + r * L::STRIDE + c * static_cast<int>(sizeof(T)) / 4) = x;
    }
  } else {
    T* d = reinterpret_cast<T*>(dst);
    constexpr int ESTRIDE = L::STRIDE * 4 / static_cast<int>(sizeof(T));  // row stride in elements
    for (int idx = threadIdx.x; idx < ROWS * kBK; idx += kThreads) {
      const int r = idx / kBK, c = idx - r * kBK;
      d[r * ESTRIDE + c] = (r < rows_valid && c < k_valid) ? src[r * stride + c] : zero_elem<T>();
    }
  }
}

// One kBK block of the warp's 16 × 64 logits: blk += A(rows) · B(cols)^T over 32 elements.
template <typename T>
__device__ __forceinline__ void mma_block(float (&blk)[kNT][4], const uint32_t* hs, const uint32_t* ws,
                                          int row0, int col0, int g, int t) {
  using L = TileLayout<T>;
#pragma unroll
  for (int kk = 0; kk < kBK; kk += 16) {
    if constexpr (std::is_same<T, float>::value) {
      const float* hf = reinterpret_cast<const float*>(hs);
      const float* wf = reinterpret_cast<const float*>(ws);
      uint32_t a[3][4];
      const float* r0 = hf + (row0 + g) * L::STRIDE + kk + 2 * t;
      const float* r8 = r0 + 8 * L::STRIDE;
      split3(r0[0], r0[1], a[0][0], a[1][0], a[2][0]);
      split3(r8[0], r8[1], a[0][1], a[1][1], a[2][1]);
      split3(r0[8], r0[9], a[0][2], a[1][2], a[2][2]);
      split3(r8[8], r8[9], a[0][3], a[1][3], a[2][3]);
#pragma unroll
      for (int ni = 0; ni < kNT; ++ni) {
        const float* wr = wf + (col0 + ni * 8 + g) * L::STRIDE + kk + 2 * t;
        uint32_t b[3][2];
        split3(wr[0], wr[1], b[0][0], b[1][0], b[2][0]);
        split3(wr[8], wr[9], b[0][1], b[1][1], b[2][1]);
        // Smallest terms first, so they are not absorbed by the large one.
        mma_bf16(blk[ni], a[2], b[0]);
        mma_bf16(blk[ni], a[1], b[1]);
        mma_bf16(blk[ni], a[0], b[2]);
        mma_bf16(blk[ni], a[1], b[0]);
        mma_bf16(blk[ni], a[0], b[1]);
        mma_bf16(blk[ni], a[0], b[0]);
      }
    } else {
      uint32_t a[4];
      const uint32_t* r0 = hs + (row0 + g) * L::STRIDE + kk / 2 + t;
      a[0] = r0[0];
      a[1] = r0[8 * L::STRIDE];
      a[2] = r0[4];
      a[3] = r0[8 * L::STRIDE + 4];
#pragma unroll
      for (int ni = 0; ni < kNT; ++ni) {
        const uint32_t* wr = ws + (col0 + ni * 8 + g) * L::STRIDE + kk / 2 + t;
        const uint32_t b[2] = {wr[0], wr[4]};
        if constexpr (std::is_same<T, __half>::value) mma_f16(blk[ni], a, b);
        else mma_bf16(blk[ni], a, b);
      }
    }
  }
}

// The tempered fp32 logits of tokens [0, rows_valid) of h × vocabulary rows [0, cols_valid)
// of w, for this warp's fragment: z[ni][r] is row 16·(warp % 4) + g (+8 for r >= 2), column
// 64·(warp / 4) + 8·ni + 2t + (r & 1). Rows/columns past the valid ones hold 0 · inv_temp.
// Each kBK block's MMA sum is added to the running logit with a two-sum (acc + comp), as the
// Triton kernel does: at |logit| ~ 100 an fp32 ulp is 7.6e-6, and a plain running sum over
// K / kBK blocks drifts by several ulps. Starts and ends with a block barrier (hs/ws reuse).
template <typename T>
__device__ __forceinline__ void logit_tile(float (&z)[kNT][4], const T* h, int64_t stride_h, int rows_valid,
                                           const T* w, int64_t stride_w, int cols_valid, int K, bool vec,
                                           float inv_temp, uint32_t* hs, uint32_t* ws) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int row0 = 16 * (warp % 4), col0 = 64 * (warp / 4);
  float acc[kNT][4], comp[kNT][4];
#pragma unroll
  for (int ni = 0; ni < kNT; ++ni)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[ni][r] = comp[ni][r] = 0.f;
  for (int k0 = 0; k0 < K; k0 += kBK) {
    __syncthreads();  // every warp is done reading the previous block's tiles
    load_tile<T, kBT>(hs, h + k0, stride_h, rows_valid, K - k0, vec);
    load_tile<T, kBV>(ws, w + k0, stride_w, cols_valid, K - k0, vec);
    __syncthreads();
    float blk[kNT][4];
#pragma unroll
    for (int ni = 0; ni < kNT; ++ni)
#pragma unroll
      for (int r = 0; r < 4; ++r) blk[ni][r] = 0.f;
    mma_block<T>(blk, hs, ws, row0, col0, g, t);
#pragma unroll
    for (int ni = 0; ni < kNT; ++ni)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const float tot = acc[ni][r] + blk[ni][r];
        const float bp = tot - acc[ni][r];
        comp[ni][r] += (acc[ni][r] - (tot - bp)) + (blk[ni][r] - bp);
        acc[ni][r] = tot;
      }
  }
  __syncthreads();  // the tiles may be overwritten by the next call
#pragma unroll
  for (int ni = 0; ni < kNT; ++ni)
#pragma unroll
    for (int r = 0; r < 4; ++r) z[ni][r] = (acc[ni][r] + comp[ni][r]) * inv_temp;
}

// Shared by the launchers: scalar loads and stores need element-aligned pointers (nullptr passes).
__host__ __forceinline__ bool elem_aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Shared by the launchers: 16-byte staging is legal when every row starts 16-byte aligned.
__host__ __forceinline__ bool vec_ok(const void* h, const void* w, int64_t K, int64_t stride_h,
                                     int64_t stride_w, size_t elem) {
  const int64_t per = static_cast<int64_t>(16 / elem);
  return reinterpret_cast<uintptr_t>(h) % 16 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0 &&
         K % per == 0 && stride_h % per == 0 && stride_w % per == 0;
}

}  // namespace head
}  // namespace mm1
