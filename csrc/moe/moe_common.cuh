// Device helpers shared by the MoE kernels: element conversion, index loads, the expert
// mapping, and the only inline asm of csrc/moe (cp.async, ldmatrix, mma.sync m16n8k16).
//
// Every asm statement sits in one small named function below, so that the host emulation
// (tests/cuda_emulation/gen_moe.py) can replace exactly these bodies and nothing else.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "moe/moe.h"

namespace mm1 {
namespace moe {

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

// Two values as one 32-bit MMA operand register: `lo` in bits 0-15 (the lower k index).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T a = from_float<T>(lo), b = from_float<T>(hi);
  uint16_t ua, ub;
  static_assert(sizeof(T) == 2, "16-bit MMA operands");
  memcpy(&ua, &a, 2);
  memcpy(&ub, &b, 2);
  return static_cast<uint32_t>(ua) | (static_cast<uint32_t>(ub) << 16);
}

// Element i of an int32 or int64 index array, widened to 64 bits (no truncation of a bad id).
__device__ __forceinline__ int64_t load_index(const void* p, int index_bytes, int64_t i) {
  return index_bytes == 8 ? static_cast<const int64_t*>(p)[i]
                          : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
}

// The local expert of a routing id, as the Triton kernels' local_expert: in [0, E); -1 for an
// expert the map places on another rank (contributes exactly zero); -2 for an id or map value
// out of range (never placed; its token's output row is NaN). Range tests come before any
// narrowing, so a huge int64 id cannot wrap into range.
struct ExpertMap {
  const void* ids;
  int ids_bytes;
  const void* map;  // nullptr: ids are local already
  int map_bytes;
  int64_t map_len;  // G
  int num_experts;  // E (local)
};

__device__ __forceinline__ int local_expert(const ExpertMap& m, int64_t entry) {
  int64_t id = load_index(m.ids, m.ids_bytes, entry);
  if (m.map != nullptr) {
    if (id < 0 || id >= m.map_len) return -2;
    id = load_index(m.map, m.map_bytes, id);
    if (id == -1) return -1;
  }
  return (id >= 0 && id < m.num_experts) ? static_cast<int>(id) : -2;
}

// ---- asm: asynchronous copies ------------------------------------------------------------
// 16 bytes global -> shared; only the first src_bytes (0..16) are read, the rest of the 16
// destination bytes are zero-filled (row and K tails, padding rows). Both addresses 16-byte
// aligned. .cg: bypass L1 (every tile is read once per CTA).
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Wait until at most N of this thread's committed groups are still in flight.
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ---- asm: ldmatrix -----------------------------------------------------------------------
// Four 8x8 matrices of 16-bit elements; lane l gives the address of row l % 8 of matrix l / 8
// (16 contiguous bytes) and receives, per matrix m, r[m] = row l / 4, elements 2(l%4), 2(l%4)+1.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// ---- asm: tensor-core MMA, m16n8k16, fp32 accumulators -------------------------------------
// Fragment layouts (g = lane / 4, t = lane % 4; each register holds two 16-bit values, the
// lower k or column index in the low half):
//   A 16x16 row-major: a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B 16x8 (k x n):    b0 (k=2t..2t+1, n=g), b1 (k=2t+8.., n=g)
//   C 16x8:            c0 (g, 2t), c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1)
__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void mma_f16_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    mma_bf16_16816(c, a, b);
  } else {
    mma_f16_16816(c, a, b);
  }
}

}  // namespace moe
}  // namespace mm1
