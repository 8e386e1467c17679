// Host emulation of the CUDA features the lightning kernels use. Included BEFORE the generated
// kernel sources (see gen.py). One CTA runs as 256 std::threads: std::barrier stands in for
// __syncthreads; per-warp barriers make mma.sync, ldmatrix and __shfl_xor_sync warp-collective.
// cp.async copies are deferred until the cp.async.wait_group that covers them (so a missing
// wait leaves the NaN poison or a stale tile in shared memory).
// Shared memory: dynamic smem is a host buffer the test NaN-fills before every block; static
// __shared__ arrays become function-local statics that each block NaN-fills on entry
// (emu_poison_shared, inserted by gen.py).
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __global__
#define __global__

inline thread_local uint3 emu_threadIdx;
inline uint3 emu_blockIdx;
#define threadIdx emu_threadIdx
#define blockIdx emu_blockIdx
inline std::barrier<>* emu_block_bar;
inline std::barrier<>* emu_warp_bar[32];
inline float emu_shfl_buf[32][32];
inline uint32_t emu_mma_a[32][32][4], emu_mma_b[32][32][2];
inline long emu_mma_count;  // mma.sync calls (any shape) of warp 0 in the current case
inline unsigned char* emu_dyn_smem;
inline size_t emu_dyn_smem_bytes;  // 0: unknown (the shared-space checks below are skipped)

inline void __syncthreads() { emu_block_bar->arrive_and_wait(); }
template <class T> inline T min(T a, T b) { return a < b ? a : b; }
template <class T> inline T max(T a, T b) { return a > b ? a : b; }
inline float emu_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t emu_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
#define __uint_as_float(u) emu_as_float(u)
#define __int_as_float(u) emu_as_float(static_cast<uint32_t>(u))
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }

// Every thread calls this at kernel entry for each static __shared__ array.
inline void emu_poison_shared(void* p, size_t bytes) {
  emu_block_bar->arrive_and_wait();
  if (emu_threadIdx.x == 0) std::memset(p, 0xff, bytes);  // 0xffffffff is a NaN
  emu_block_bar->arrive_and_wait();
}

template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int off) {
  static_assert(sizeof(T) == 4, "emulated for 32-bit values");
  if (mask != 0xffffffffu) { std::fprintf(stderr, "emu: partial shuffle mask\n"); std::abort(); }
  const int tid = threadIdx.x, w = tid / 32, l = tid % 32;
  std::memcpy(&emu_shfl_buf[w][l], &v, 4);
  emu_warp_bar[w]->arrive_and_wait();
  T r;
  std::memcpy(&r, &emu_shfl_buf[w][l ^ off], 4);
  emu_warp_bar[w]->arrive_and_wait();
  return r;
}

// cvt.rna.tf32.f32: round to nearest, ties away from zero, keep 10 mantissa bits.
inline uint32_t emu_to_tf32(float x) {
  uint32_t u = emu_as_uint(x);
  if ((u & 0x7f800000u) == 0x7f800000u) return u;  // inf/nan
  u += 0x1000u;
  return u & 0xffffe000u;
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, layouts from the PTX ISA, written
// independently of the kernel: g = lane>>2, t = lane&3;
//   A: a0 (g,t) a1 (g+8,t) a2 (g,t+4) a3 (g+8,t+4); B: b0 (k=t,n=g) b1 (k=t+4,n=g);
//   C: c0 (g,2t) c1 (g,2t+1) c2 (g+8,2t) c3 (g+8,2t+1).
// The hardware ignores the low 13 bits of a .tf32 operand; products are accumulated in double
// (real tensor cores accumulate in fp32 in an unspecified order).
inline void emu_mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const int tid = threadIdx.x, w = tid / 32, l = tid % 32;
  for (int i = 0; i < 4; ++i) emu_mma_a[w][l][i] = a[i] & 0xffffe000u;
  for (int i = 0; i < 2; ++i) emu_mma_b[w][l][i] = b[i] & 0xffffe000u;
  emu_warp_bar[w]->arrive_and_wait();
  double A[16][8], B[8][8];
  for (int ln = 0; ln < 32; ++ln) {
    const int g = ln >> 2, t = ln & 3;
    A[g][t] = emu_as_float(emu_mma_a[w][ln][0]);
    A[g + 8][t] = emu_as_float(emu_mma_a[w][ln][1]);
    A[g][t + 4] = emu_as_float(emu_mma_a[w][ln][2]);
    A[g + 8][t + 4] = emu_as_float(emu_mma_a[w][ln][3]);
    B[t][g] = emu_as_float(emu_mma_b[w][ln][0]);
    B[t + 4][g] = emu_as_float(emu_mma_b[w][ln][1]);
  }
  emu_warp_bar[w]->arrive_and_wait();
  if (tid == 0) ++emu_mma_count;
  const int g = l >> 2, t = l & 3;
  const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
  for (int r = 0; r < 4; ++r) {
    double s = c[r];
    for (int k = 0; k < 8; ++k) s += A[rows[r]][k] * B[k][cols[r]];
    c[r] = static_cast<float>(s);
  }
}

// ---- 16-bit tensor cores, ldmatrix, cp.async ------------------------------------------------

[[noreturn]] inline void emu_fail(const char* what) {
  std::fprintf(stderr, "emu: %s (thread %u)\n", what, emu_threadIdx.x);
  std::abort();
}

// A shared-memory address as ldmatrix / cp.async require it: inside the dynamic shared memory
// (when its size is known) and 16-byte aligned.
inline void emu_check_shared16(const void* p, size_t bytes, const char* what) {
  const auto a = reinterpret_cast<uintptr_t>(p), base = reinterpret_cast<uintptr_t>(emu_dyn_smem);
  if (a % 16) emu_fail(what);
  if (emu_dyn_smem_bytes && (a < base || a + bytes > base + emu_dyn_smem_bytes)) emu_fail(what);
}

inline float emu_b16_to_float(uint16_t h, bool is_bf16) {
  if (is_bf16) return emu_as_float(static_cast<uint32_t>(h) << 16);
  __half x;
  std::memcpy(&x, &h, 2);
  return __half2float(x);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32, from the PTX ISA fragment
// layouts, independently of the kernel (g = lane>>2, t = lane&3; two 16-bit elements per
// register, the lower index in the low half):
//   A 16x16: a0 (g, 2t..2t+1) a1 (g+8, 2t..) a2 (g, 2t+8..) a3 (g+8, 2t+8..)
//   B 16x8:  b0 (k=2t..2t+1, n=g) b1 (k=2t+8..2t+9, n=g);  C as m16n8k8.
// Products are exact in double and accumulated in double (real tensor cores: fp32, order
// unspecified).
inline void emu_mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool is_bf16) {
  const int tid = threadIdx.x, w = tid / 32, l = tid % 32;
  for (int i = 0; i < 4; ++i) emu_mma_a[w][l][i] = a[i];
  for (int i = 0; i < 2; ++i) emu_mma_b[w][l][i] = b[i];
  emu_warp_bar[w]->arrive_and_wait();
  double A[16][16], B[16][8];
  auto lo = [&](uint32_t r) { return (double)emu_b16_to_float(static_cast<uint16_t>(r & 0xffffu), is_bf16); };
  auto hi = [&](uint32_t r) { return (double)emu_b16_to_float(static_cast<uint16_t>(r >> 16), is_bf16); };
  for (int ln = 0; ln < 32; ++ln) {
    const int g = ln >> 2, t = ln & 3;
    const uint32_t* ra = emu_mma_a[w][ln];
    const uint32_t* rb = emu_mma_b[w][ln];
    A[g][2 * t] = lo(ra[0]);         A[g][2 * t + 1] = hi(ra[0]);
    A[g + 8][2 * t] = lo(ra[1]);     A[g + 8][2 * t + 1] = hi(ra[1]);
    A[g][2 * t + 8] = lo(ra[2]);     A[g][2 * t + 9] = hi(ra[2]);
    A[g + 8][2 * t + 8] = lo(ra[3]); A[g + 8][2 * t + 9] = hi(ra[3]);
    B[2 * t][g] = lo(rb[0]);         B[2 * t + 1][g] = hi(rb[0]);
    B[2 * t + 8][g] = lo(rb[1]);     B[2 * t + 9][g] = hi(rb[1]);
  }
  emu_warp_bar[w]->arrive_and_wait();
  if (tid == 0) ++emu_mma_count;
  const int g = l >> 2, t = l & 3;
  const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
  for (int r = 0; r < 4; ++r) {
    double s = c[r];
    for (int k = 0; k < 16; ++k) s += A[rows[r]][k] * B[k][cols[r]];
    c[r] = static_cast<float>(s);
  }
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 (PTX ISA): lanes 8j..8j+7 give the row
// addresses of matrix j (16 bytes each); register j of lane l receives matrix j's elements
// (row l/4, columns 2(l%4), 2(l%4)+1), or with .trans (rows 2(l%4), 2(l%4)+1, column l/4).
// cvta.to.shared: a 32-bit shared-window address; here the offset into the dynamic shared memory
// buffer (shared memory outside it, e.g. static __shared__ arrays, is not supported: abort).
inline uint32_t emu_smem_u32(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p), base = reinterpret_cast<uintptr_t>(emu_dyn_smem);
  if (a < base || (emu_dyn_smem_bytes && a > base + emu_dyn_smem_bytes)) emu_fail("cvta.to.shared of a non-shared pointer");
  return static_cast<uint32_t>(a - base);
}

inline const void* emu_ldsm_rows[32][32];
inline void emu_ldsm_x4(uint32_t (&r)[4], const void* row_ptr, bool trans) {
  const int tid = threadIdx.x, w = tid / 32, l = tid % 32;
  emu_check_shared16(row_ptr, 16, "ldmatrix row address not 16-byte aligned or outside shared memory");
  emu_ldsm_rows[w][l] = row_ptr;
  emu_warp_bar[w]->arrive_and_wait();
  auto elem = [&](int mat, int row, int col) {
    uint16_t h;
    std::memcpy(&h, static_cast<const unsigned char*>(emu_ldsm_rows[w][8 * mat + row]) + 2 * col, 2);
    return static_cast<uint32_t>(h);
  };
  const int q = l / 4, p = 2 * (l % 4);
  for (int j = 0; j < 4; ++j)
    r[j] = trans ? (elem(j, p, q) | elem(j, p + 1, q) << 16) : (elem(j, q, p) | elem(j, q, p + 1) << 16);
  emu_warp_bar[w]->arrive_and_wait();
}
// The same with a 32-bit shared address (emu_smem_u32).
inline void emu_ldsm_x4(uint32_t (&r)[4], uint32_t addr, bool trans) { emu_ldsm_x4(r, emu_dyn_smem + addr, trans); }

// cp.async.cg.shared.global [dst], [src], 16, src_bytes: recorded, performed (src_bytes read,
// the rest of the 16 zero-filled) by the cp.async.wait_group that covers its group. A copy never
// committed, or committed but never waited for, never lands.
struct EmuCpAsync {
  void* dst;
  const void* src;
  int src_bytes;
};
inline thread_local std::vector<EmuCpAsync> emu_cp_open;
inline thread_local std::deque<std::vector<EmuCpAsync>> emu_cp_groups;
inline void emu_cp_async16(void* dst, const void* src, int src_bytes) {
  emu_check_shared16(dst, 16, "cp.async destination not 16-byte aligned or outside shared memory");
  if (src_bytes < 0 || src_bytes > 16) emu_fail("cp.async src-size outside [0, 16]");
  if (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % 16) emu_fail("cp.async source not 16-byte aligned");
  emu_cp_open.push_back({dst, src, src_bytes});
}
inline void emu_cp_async_commit() {
  emu_cp_groups.push_back(std::move(emu_cp_open));
  emu_cp_open.clear();
}
inline void emu_cp_async_wait(int pending) {
  while (emu_cp_groups.size() > static_cast<size_t>(pending)) {
    for (const EmuCpAsync& c : emu_cp_groups.front()) {
      if (c.src_bytes) std::memcpy(c.dst, c.src, c.src_bytes);
      std::memset(static_cast<unsigned char*>(c.dst) + c.src_bytes, 0, 16 - c.src_bytes);
    }
    emu_cp_groups.pop_front();
  }
}

// ---- test-side helpers ----------------------------------------------------------------------

// Runs body() as one CTA of `threads` threads (a multiple of 32).
inline void emu_run_block(int threads, uint3 block, const std::function<void()>& body) {
  emu_blockIdx = block;
  std::barrier<> bb(threads);
  std::vector<std::unique_ptr<std::barrier<>>> wb;
  for (int w = 0; w < threads / 32; ++w) {
    wb.push_back(std::make_unique<std::barrier<>>(32));
    emu_warp_bar[w] = wb.back().get();
  }
  emu_block_bar = &bb;
  std::vector<std::thread> th;
  th.reserve(threads);
  for (int i = 0; i < threads; ++i)
    th.emplace_back([&body, i] { emu_threadIdx = make_uint3(i, 0, 0); body(); });
  for (auto& x : th) x.join();
}

template <class T> float emu_tof(T x);
template <> inline float emu_tof<float>(float x) { return x; }
template <> inline float emu_tof<__half>(__half x) { return __half2float(x); }
template <> inline float emu_tof<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> T emu_fromf(float x);
template <> inline float emu_fromf<float>(float x) { return x; }
template <> inline __half emu_fromf<__half>(float x) { return __float2half_rn(x); }
template <> inline __nv_bfloat16 emu_fromf<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <class T> const char* emu_dtype_name();
template <> inline const char* emu_dtype_name<float>() { return "float32"; }
template <> inline const char* emu_dtype_name<__half>() { return "float16"; }
template <> inline const char* emu_dtype_name<__nv_bfloat16>() { return "bfloat16"; }

// One machine-readable result line: EMU_RESULT {json}. Python decides pass/fail.
struct EmuResult {
  std::string body;
  EmuResult(const char* kernel, const std::string& name) {
    body = "{\"kernel\": \"" + std::string(kernel) + "\", \"name\": \"" + name + "\"";
  }
  EmuResult& num(const char* key, double v) {
    char buf[64];
    if (std::isnan(v)) std::snprintf(buf, sizeof buf, "NaN");
    else if (std::isinf(v)) std::snprintf(buf, sizeof buf, v > 0 ? "Infinity" : "-Infinity");
    else std::snprintf(buf, sizeof buf, "%.9g", v);
    body += std::string(", \"") + key + "\": " + buf;
    return *this;
  }
  EmuResult& str(const char* key, const std::string& v) {
    body += std::string(", \"") + key + "\": \"" + v + "\"";
    return *this;
  }
  void print() const { std::printf("EMU_RESULT %s}\n", body.c_str()); std::fflush(stdout); }
};

// argv[1] (optional): run only the case with this name.
inline bool emu_want(int argc, char** argv, const std::string& name) { return argc < 2 || name == argv[1]; }
