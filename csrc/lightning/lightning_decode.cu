// One lightning-attention decode step on a slot-indexed fp32 state cache.
//
// Memory-bound: per (row, head) the step reads and writes the [D, DV] fp32 state once (64 KiB
// each way at D = DV = 128) and touches only 3·D inputs, so the kernel is a streaming copy with
// a little arithmetic: S' = λ S + k^T v, o = q S'.
//
// Work decomposition: one 256-thread block per (batch row, head, value slice of W columns).
// Each thread owns VEC (4: one 16-byte float4) consecutive columns of the slice and every
// (256/TPR)-th row, TPR = W / VEC threads covering a row, so a warp reads 32·16 = 512 contiguous
// bytes when TPR = 32 and several full 128-byte lines otherwise. Each thread issues up to
// kUnroll independent 16-byte loads before the first use. The column sums o = q S' are reduced
// over rows with warp shuffles, then across the 8 warps through shared memory.
//
// The host picks W from the batch: at large batch a block takes the whole row of the state
// (W = DV) so blocks are big and few; as the batch shrinks W narrows (down to 4·VEC) so that
// B·H·⌈DV/W⌉ blocks still cover the GPU twice: at batch 1 and M1's shape, 64 heads × 8 slices.
//
// Padding rows (negative slot) write zeros and never touch the state; an out-of-range slot
// writes NaN and never touches the state. Both are decided per block on the device, so the
// launch needs nothing from the host and can be captured in a CUDA graph.
#include "lightning/lightning_common.cuh"

namespace mm1 {
namespace lightning {
namespace {

constexpr int kDecodeThreads = 256;
constexpr int kDecodeWarps = kDecodeThreads / 32;
constexpr int kUnroll = 8;

struct DecodeArgs {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  const float* slopes;
  float* state;
  const void* slot_ids;
  int slot_index_bytes;
  int heads, head_dim, value_dim;
  int64_t num_slots;
  int64_t stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_ob, stride_oh;
};

template <int VEC> struct Vec;
template <> struct Vec<4> {
  using type = float4;
  static __device__ __forceinline__ float get(const float4& x, int i) {
    return i == 0 ? x.x : i == 1 ? x.y : i == 2 ? x.z : x.w;
  }
  static __device__ __forceinline__ void set(float4& x, int i, float val) {
    if (i == 0) x.x = val; else if (i == 1) x.y = val; else if (i == 2) x.z = val; else x.w = val;
  }
};
template <> struct Vec<1> {
  using type = float;
  static __device__ __forceinline__ float get(const float& x, int) { return x; }
  static __device__ __forceinline__ void set(float& x, int, float val) { x = val; }
};

template <typename T, int VEC, int TPR>
__global__ void __launch_bounds__(kDecodeThreads)
lightning_decode_kernel(const DecodeArgs a) {
  constexpr int W = TPR * VEC;                    // columns per block
  constexpr int ROWS_PER_PASS = kDecodeThreads / TPR;
  using V = Vec<VEC>;
  using VT = typename V::type;

  __shared__ float q_s[MM1_LIGHTNING_MAX_HEAD_DIM];
  __shared__ float k_s[MM1_LIGHTNING_MAX_HEAD_DIM];
  __shared__ float v_s[W];
  __shared__ float red_s[kDecodeWarps][W];

  const int64_t b = blockIdx.x;
  const int h = blockIdx.y;
  const int col0 = blockIdx.z * W;
  const int tid = threadIdx.x;
  const int D = a.head_dim, DV = a.value_dim;

  const int64_t slot = a.slot_ids ? load_index(a.slot_ids, a.slot_index_bytes, b) : b;
  T* o_row = static_cast<T*>(a.o) + b * a.stride_ob + h * a.stride_oh;
  if (slot < 0 || slot >= a.num_slots) {  // block-uniform: padding (0) or a bad id (NaN)
    const float fill = slot < 0 ? 0.0f : __int_as_float(0x7fc00000);
    for (int c = tid; c < W; c += kDecodeThreads)
      if (col0 + c < DV) o_row[col0 + c] = from_float<T>(fill);
    return;
  }

  const T* q = static_cast<const T*>(a.q) + b * a.stride_qb + h * a.stride_qh;
  const T* k = static_cast<const T*>(a.k) + b * a.stride_kb + h * a.stride_kh;
  const T* v = static_cast<const T*>(a.v) + b * a.stride_vb + h * a.stride_vh;
  for (int d = tid; d < D; d += kDecodeThreads) {
    q_s[d] = to_float(q[d]);
    k_s[d] = to_float(k[d]);
  }
  for (int c = tid; c < W; c += kDecodeThreads) v_s[c] = col0 + c < DV ? to_float(v[col0 + c]) : 0.0f;
  const float lam = decay_pow(a.slopes[h], 1);
  __syncthreads();

  const int cg = tid % TPR;            // this thread's column group in the slice
  const int r0 = tid / TPR;            // its first row
  const int col = col0 + cg * VEC;     // first of its VEC columns (DV % VEC == 0 on this path)
  float v_loc[VEC];
  float acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    v_loc[i] = v_s[cg * VEC + i];
    acc[i] = 0.0f;
  }

  if (col < DV) {
    float* st = a.state + ((slot * a.heads + h) * D) * static_cast<int64_t>(DV) + col;
    for (int r = r0; r < D; r += ROWS_PER_PASS * kUnroll) {
      VT s[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {  // all loads in flight before the first use
        const int rr = r + u * ROWS_PER_PASS;
        if (rr < D) s[u] = __ldcs(reinterpret_cast<const VT*>(st + static_cast<int64_t>(rr) * DV));
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int rr = r + u * ROWS_PER_PASS;
        if (rr < D) {
          const float kr = k_s[rr], qr = q_s[rr];
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            const float sn = fmaf(kr, v_loc[i], V::get(s[u], i) * lam);
            V::set(s[u], i, sn);
            acc[i] = fmaf(qr, sn, acc[i]);
          }
          // Streaming store: the state is not re-read by this step.
          __stcs(reinterpret_cast<VT*>(st + static_cast<int64_t>(rr) * DV), s[u]);
        }
      }
    }
  }

  // Sum over rows: lanes with the same column group differ in the lane bits above TPR.
#pragma unroll
  for (int off = TPR; off < 32; off *= 2) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], off);
  }
  const int lane = tid % 32, warp = tid / 32;
  if (lane < TPR) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) red_s[warp][lane * VEC + i] = acc[i];
  }
  __syncthreads();
  for (int c = tid; c < W; c += kDecodeThreads) {
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) sum += red_s[w][c];
    if (col0 + c < DV) o_row[col0 + c] = from_float<T>(sum);
  }
}

int multiprocessor_count() {
  int device = 0, count = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    return 132;
  return count;
}

template <typename T, int VEC, int TPR>
cudaError_t launch_decode(const DecodeArgs& a, int64_t batch, cudaStream_t stream) {
  constexpr int W = TPR * VEC;
  const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(a.heads),
                  static_cast<unsigned>((a.value_dim + W - 1) / W));
  lightning_decode_kernel<T, VEC, TPR><<<grid, kDecodeThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t dispatch_tpr(const DecodeArgs& a, int64_t batch, cudaStream_t stream) {
  // Widest slice that is not mostly padding and still gives ≥ 2 blocks per SM.
  const int64_t target = 2 * static_cast<int64_t>(multiprocessor_count());
  int tpr = 32;
  while (tpr > 4 && (tpr / 2) * VEC >= a.value_dim) tpr /= 2;
  while (tpr > 4 && batch * a.heads * ((a.value_dim + tpr * VEC - 1) / (tpr * VEC)) < target) tpr /= 2;
  switch (tpr) {
    case 32: return launch_decode<T, VEC, 32>(a, batch, stream);
    case 16: return launch_decode<T, VEC, 16>(a, batch, stream);
    case 8: return launch_decode<T, VEC, 8>(a, batch, stream);
    default: return launch_decode<T, VEC, 4>(a, batch, stream);
  }
}

template <typename T>
cudaError_t dispatch_vec(const DecodeArgs& a, int64_t batch, cudaStream_t stream) {
  // 16-byte state accesses need DV % 4 == 0 and a 16-byte aligned cache (then every row is).
  const bool vec4 = a.value_dim % 4 == 0 && reinterpret_cast<uintptr_t>(a.state) % 16 == 0;
  return vec4 ? dispatch_tpr<T, 4>(a, batch, stream) : dispatch_tpr<T, 1>(a, batch, stream);
}

}  // namespace
}  // namespace lightning
}  // namespace mm1

extern "C" MM1_API cudaError_t mm1_lightning_decode(
    mm1_dtype_t dtype, const void* q, const void* k, const void* v, void* o,
    const float* slopes, float* state_cache, const void* slot_ids, int slot_index_bytes,
    int64_t batch, int64_t heads, int64_t head_dim, int64_t value_dim, int64_t num_slots,
    int64_t stride_qb, int64_t stride_qh, int64_t stride_kb, int64_t stride_kh,
    int64_t stride_vb, int64_t stride_vh, int64_t stride_ob, int64_t stride_oh,
    cudaStream_t stream) {
  using namespace mm1::lightning;
  if (batch < 0 || heads < 1 || heads > 65535 || head_dim < 1 || value_dim < 1 ||
      head_dim > MM1_LIGHTNING_MAX_HEAD_DIM || value_dim > MM1_LIGHTNING_MAX_HEAD_DIM ||
      batch > 0x7fffffff || num_slots < 0 ||
      (slot_ids != nullptr && slot_index_bytes != 4 && slot_index_bytes != 8))
    return cudaErrorInvalidValue;
  if (batch == 0) return cudaSuccess;
  if (!q || !k || !v || !o || !slopes || (!state_cache && num_slots > 0)) return cudaErrorInvalidValue;
  DecodeArgs a{q, k, v, o, slopes, state_cache, slot_ids, slot_index_bytes,
               static_cast<int>(heads), static_cast<int>(head_dim), static_cast<int>(value_dim),
               num_slots, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
               stride_ob, stride_oh};
  switch (dtype) {
    case MM1_DTYPE_FLOAT32: return dispatch_vec<float>(a, batch, stream);
    case MM1_DTYPE_FLOAT16: return dispatch_vec<__half>(a, batch, stream);
    case MM1_DTYPE_BFLOAT16: return dispatch_vec<__nv_bfloat16>(a, batch, stream);
  }
  return cudaErrorInvalidValue;
}
