// Device helpers shared by the lightning kernels: element conversion, index loads, the TF32
// tensor-core MMA (optionally split 3x for fp32-accurate products), and the bf16 MMA, ldmatrix
// and cp.async wrappers of the bf16 prefill.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "lightning/lightning.h"

namespace mm1 {
namespace lightning {

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Four consecutive elements as fp32; the caller guarantees 4-element alignment.
template <typename T> __device__ __forceinline__ float4 load4(const T* p);
template <> __device__ __forceinline__ float4 load4<float>(const float* p) {
  return *reinterpret_cast<const float4*>(p);
}
template <> __device__ __forceinline__ float4 load4<__half>(const __half* p) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&raw.x));
  const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&raw.y));
  return make_float4(a.x, a.y, b.x, b.y);
}
template <> __device__ __forceinline__ float4 load4<__nv_bfloat16>(const __nv_bfloat16* p) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
  const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
  return make_float4(a.x, a.y, b.x, b.y);
}

// Element i of an int32 or int64 index array, widened to 64 bits (no truncation of a bad id).
__device__ __forceinline__ int64_t load_index(const void* p, int index_bytes, int64_t i) {
  return index_bytes == 8 ? static_cast<const int64_t*>(p)[i]
                          : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
}

// λ^e = exp(-s·e) rounded once to fp32. Computed in double so that --use_fast_math (which
// turns expf into ex2.approx of a rounded product) cannot perturb the decays; it runs a few
// dozen times per block, never in an inner loop.
__device__ __forceinline__ float decay_pow(float slope, int e) {
  return static_cast<float>(exp(-static_cast<double>(slope) * static_cast<double>(e)));
}

// ---- TF32 tensor-core MMA, m16n8k8, fp32 accumulators -------------------------------------
// Fragment layouts (g = lane / 4, t = lane % 4):
//   A 16x8 row-major: a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4)
//   B 8x8 (k x n):    b0 (k=t, n=g), b1 (k=t+4, n=g)
//   C 16x8:           c0 (g, 2t), c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1)

__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ void mma_tf32(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// An operand fragment of N fp32 values in TF32. With SPLIT (fp32 inputs) each value is
// hi + lo, both TF32, and a product costs three MMAs (lo·hi + hi·lo + hi·hi): about fp32
// accuracy (the dropped lo·lo term is ~2^-22 relative) at tensor-core speed. Without SPLIT
// (fp16 inputs; bf16 has its own kernel) one rounded TF32 MMA, the precision the Triton kernel
// uses for fp16's products with an fp32 operand; fp16 values themselves are exact in TF32.
template <int N, bool SPLIT> struct Tf32Frag {
  uint32_t hi[N];
  uint32_t lo[N];
  __device__ __forceinline__ void set(int i, float x) {
    hi[i] = to_tf32(x);
    if (SPLIT) lo[i] = to_tf32(x - __uint_as_float(hi[i]));
  }
};

template <bool SPLIT>
__device__ __forceinline__ void mma(float (&c)[4], const Tf32Frag<4, SPLIT>& a, const Tf32Frag<2, SPLIT>& b) {
  if (SPLIT) {
    mma_tf32(c, a.lo, b.hi);
    mma_tf32(c, a.hi, b.lo);
  }
  mma_tf32(c, a.hi, b.hi);
}

// A split into hi + lo whatever B is: for products whose A operand is an fp32 value that must
// keep ~fp32 accuracy although B is an exact 16-bit input (the state update's decayed keys:
// the fp32 state contract, 1e-5). B is split too when SPLIT_B (fp32 inputs: the 3xTF32 of mma).
template <bool SPLIT_B>
__device__ __forceinline__ void mma_split_a(float (&c)[4], const Tf32Frag<4, true>& a,
                                            const Tf32Frag<2, SPLIT_B>& b) {
  mma_tf32(c, a.lo, b.hi);
  if (SPLIT_B) mma_tf32(c, a.hi, b.lo);
  mma_tf32(c, a.hi, b.hi);
}

// ---- bf16 tensor cores: mma.sync m16n8k16, ldmatrix, cp.async -----------------------------
// Fragment layouts of m16n8k16 (g = lane / 4, t = lane % 4; two 16-bit values per register,
// the lower column / k index in the low half):
//   A 16x16 row-major: a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B 16x8 (k x n):    b0 (k=2t..2t+1, n=g), b1 (k=2t+8..2t+9, n=g)
//   C 16x8 fp32:       as m16n8k8 above
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// A generic pointer into shared memory as a 32-bit shared-window address (for ldmatrix: the
// kernels compute a lane's base address once and add compile-time offsets).
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  uint32_t a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}

// Four 8x8 b16 matrices from shared memory; lane l gives the address (smem_u32) of row l % 8 of
// matrix l / 8 (16 contiguous bytes, 16-byte aligned). Register j receives matrix j's (row g,
// columns 2t, 2t+1); with .trans its (rows 2t, 2t+1, column g), i.e. the transposed matrix's
// fragment. The "memory" clobber keeps the compiler from moving the read across the stores and
// barriers that produce the tile.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");
}

// 16 bytes global -> shared, asynchronously (bypassing L1); the first src_bytes (0 or 16) are
// read, the rest of the 16 is zero-filled. Both addresses 16-byte aligned.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(src_bytes) : "memory");
}
// Closes the group of this thread's cp.async issued since the last commit.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most N of this thread's committed groups are pending. Other threads' copies
// are visible only after a following barrier.
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo
  return *reinterpret_cast<const uint32_t*>(&v);
}
__device__ __forceinline__ float2 unpack_bf16x2(uint32_t u) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u));
}

// Fields every prefill kernel reads (set by mm1_lightning_prefill in lightning_prefill.cu).
struct PrefillArgs {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  const float* slopes;
  const float* init;
  float* final_state;
  const void* cu_seqlens;
  int cu_index_bytes;
  int64_t seqlen;
  int heads, head_dim, value_dim;
  bool vec4;     // 4-element vector loads (TF32 kernel)
  bool async16;  // 16-byte cp.async of q/k/v rows (bf16 kernel)
  int64_t sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh;
  // Segment split (segment_len > 0; carved out of the caller's workspace, unused otherwise):
  int64_t* seg_table;  // [rows, 4]: sequence (-1 = idle row), t_start, t_end, is the sequence's last segment
  int64_t* seg_first;  // [N + 1]: each sequence's first row; seg_first[N] = rows in use
  float* seg_state;    // [rows, H, D, DV]: local states (local pass), then incoming states (scan)
};

}  // namespace lightning
}  // namespace mm1
