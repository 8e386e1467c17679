// The grouped expert GEMMs of the fused MoE on tensor cores (mma.sync m16n8k16, ldmatrix,
// cp.async multi-stage), and the C API mm1_fused_moe that chains alignment, GEMMs and combine.
//
// One kernel template, two uses (same tiles, same launch order as the Triton kernels):
//
//   gate_up (GATE_UP): row tile = kBlockM sorted slots of one expert (moe_align.cu); its rows
//     of x are gathered straight from x through sorted_ids (token = entry / k; no permuted
//     copy of x). The gate rows n and the up rows I + n of w13[e] are one 2·kBN-row B tile, so
//     a warp holds the gate and up accumulators of the same columns and the epilogue writes
//     h = silu(gate)·up in x's dtype: no [T·k, 2I] intermediate, no activation kernel.
//   down: A = h rows of the tile's slots, B = w2[e]; the epilogue multiplies the entry's
//     routing weight and stores fp32 row `entry` of rows [N, hidden]; the combine sums a
//     token's k rows in slot order.
//
// CTA: 128 threads = 4 warps as 2 (rows) x 2 (columns), tile kBlockM x kBN = 64 x 64 (gate_up:
// plus the 64 up columns), kBK = 32 per stage, kStages = 3 cp.async stages in static shared
// memory (gate_up bf16: 46 KB). Warp tile 32 x 32: 2 m16 x 4 n8 MMA tiles per k16 step, A
// fragments by ldmatrix.x4, bf16/fp16 B fragments by ldmatrix.x4 on the [n][k] weight rows
// (no transpose needed: a row of w is a column of B). Shared rows are padded (80 bytes for
// 16-bit tiles, 48 for int8) so the 8 rows an ldmatrix phase reads fall in distinct banks.
//
// int8 weight-only: the tile is copied as int8 (half the bytes of bf16: what matters at small
// batch) and each B fragment is converted in registers (|q| <= 127 is exact in bf16 and fp16);
// the fp32 per-output-channel scale multiplies the fp32 accumulator once in the epilogue,
// exact because the scale is constant along the reduction (the Triton kernels' semantics).
//
// Tails: rows past an expert's entries (sentinel N), columns past the output width and the K
// tail are zero-filled by cp.async's src-size operand, never read from global memory. Row
// tiles past the padded total (expert -1) return at once. All offsets that scale with T or E
// are 64-bit.
//
// Launch order: 1-D grid in groups of kGroupM row tiles x all column tiles, row tile fastest
// (the Triton kernels' grouped_tile): the row tiles of one expert read a weight column tile
// back to back (from L2 the second time), and a row tile's activations stay in L2 across its
// column sweep.
#include <algorithm>

#include "moe/moe_common.cuh"
#include "moe/moe_launch.h"

namespace mm1 {
namespace moe {
namespace {

constexpr int kGemmThreads = 128;
constexpr int kBN = 64;
constexpr int kBK = 32;
constexpr int kStages = 3;
constexpr int kAStride = kBK + 8;  // 16-bit elements: 80-byte rows
constexpr int kGroupM = 32;

struct GemmArgs {
  const void* a;  // gate_up: x [T, K]; down: h [slots, K]
  int64_t stride_a;
  const void* w;  // w13 [E, 2·n_out, K] or w2 [E, n_out, K]
  int64_t stride_we, stride_wn;
  const float* scale;  // int8 only
  int64_t stride_se, stride_sn;
  const int32_t* sorted_ids;
  const int32_t* block_expert;
  const float* route_w;  // down only: fp32 [N]
  void* out;             // gate_up: h (x's dtype); down: rows fp32 [N, n_out]
  int64_t ld_out;
  int64_t num_m;
  int64_t entries;
  int n_out;
  int k_dim;
  int top_k;
};

template <typename T, typename WT, bool GATE_UP>
__global__ void __launch_bounds__(kGemmThreads)
moe_gemm_kernel(const GemmArgs a) {
  constexpr bool QUANT = std::is_same<WT, int8_t>::value;
  constexpr int B_ROWS = GATE_UP ? 2 * kBN : kBN;
  constexpr int B_STRIDE = QUANT ? kBK + 16 : kBK + 8;  // in WT elements: 48 or 80 bytes per row
  constexpr int NMAT = GATE_UP ? 2 : 1;                 // accumulator sets: gate (and up)
  constexpr int W_EPC = 16 / static_cast<int>(sizeof(WT));  // weight elements per 16-byte copy
  static_assert(kBlockM == 64 && kBN == 64 && kBK == 32, "the warp layout below assumes 64x64x32 tiles");

  constexpr int A_STAGE = kBlockM * kAStride;  // elements per pipeline stage
  constexpr int B_STAGE = B_ROWS * B_STRIDE;
  // Declared as 16-byte vectors: cp.async and ldmatrix need 16-byte aligned rows.
  __shared__ uint4 a_raw[kStages * A_STAGE * 2 / 16];
  __shared__ uint4 b_raw[kStages * B_STAGE * sizeof(WT) / 16];
  // Per tile row: its element offset in a (-1 for padding rows) and its entry t·k + j (or N).
  __shared__ int64_t s_row[kBlockM];
  __shared__ int32_t s_entry[kBlockM];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int warp_m = warp / 2, warp_n = warp % 2;

  // Grouped launch order (see the file comment).
  const int64_t num_n = (a.n_out + kBN - 1) / kBN;
  const int64_t pid = blockIdx.x;
  const int64_t per_group = static_cast<int64_t>(kGroupM) * num_n;
  const int64_t first_m = pid / per_group * kGroupM;
  const int64_t rows_in_group = min(a.num_m - first_m, static_cast<int64_t>(kGroupM));
  const int64_t in_group = pid % per_group;
  const int64_t pid_m = first_m + in_group % rows_in_group;
  const int n0 = static_cast<int>(in_group / rows_in_group) * kBN;

  const int expert = a.block_expert[pid_m];
  if (expert < 0) return;  // past the padded total: no work (block-uniform)

  for (int r = tid; r < kBlockM; r += kGemmThreads) {
    const int32_t entry = a.sorted_ids[pid_m * kBlockM + r];
    const bool ok = entry < a.entries;
    s_entry[r] = entry;
    s_row[r] = !ok ? -1 : (GATE_UP ? static_cast<int64_t>(entry / a.top_k) : pid_m * kBlockM + r) * a.stride_a;
  }
  __syncthreads();

  T* const a_s = reinterpret_cast<T*>(a_raw);
  WT* const b_s = reinterpret_cast<WT*>(b_raw);
  const T* A = static_cast<const T*>(a.a);
  const WT* Wx = static_cast<const WT*>(a.w) + expert * a.stride_we;
  const int K = a.k_dim;

  auto load_stage = [&](int st, int k0) {
    // A: kBlockM rows x 4 copies of 8 elements.
    for (int c = tid; c < kBlockM * (kBK / 8); c += kGemmThreads) {
      const int r = c / (kBK / 8), kk = k0 + (c % (kBK / 8)) * 8;
      const int64_t ro = s_row[r];
      const int bytes = (ro >= 0 && kk < K) ? min(8, K - kk) * 2 : 0;
      cp_async_16(a_s + st * A_STAGE + r * kAStride + (kk - k0), bytes ? A + ro + kk : A, bytes);
    }
    // B: B_ROWS weight rows (gate_up: gate rows n0.., then up rows n_out + n0..).
    for (int c = tid; c < B_ROWS * (kBK / W_EPC); c += kGemmThreads) {
      const int r = c / (kBK / W_EPC), kk = k0 + (c % (kBK / W_EPC)) * W_EPC;
      const int col = n0 + (GATE_UP && r >= kBN ? r - kBN : r);  // output column of this row
      const int64_t wrow = (GATE_UP && r >= kBN) ? a.n_out + col : col;
      const int bytes = (col < a.n_out && kk < K) ? min(W_EPC, K - kk) * static_cast<int>(sizeof(WT)) : 0;
      cp_async_16(b_s + st * B_STAGE + r * B_STRIDE + (kk - k0), bytes ? Wx + wrow * a.stride_wn + kk : Wx, bytes);
    }
  };

  float acc[NMAT][2][4][4];
#pragma unroll
  for (int m = 0; m < NMAT; ++m)
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[m][mi][ni][r] = 0.f;

  const int KT = (K + kBK - 1) / kBK;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < KT) load_stage(s, s * kBK);
    cp_async_commit();  // empty groups too: the wait below counts groups
  }
  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<kStages - 2>();  // this thread's copies of stage kt have landed
    __syncthreads();               // everyone's have; and stage kt-1 is no longer read
    {
      const int nk = kt + kStages - 1;
      if (nk < KT) load_stage(nk % kStages, nk * kBK);
      cp_async_commit();
    }
    const T* as = a_s + (kt % kStages) * A_STAGE;
    const WT* bs = b_s + (kt % kStages) * B_STAGE;
#pragma unroll
    for (int ks = 0; ks < kBK; ks += 16) {
      uint32_t af[2][4];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
        ldmatrix_x4(af[mi], as + (warp_m * 32 + mi * 16 + lane % 16) * kAStride + ks + (lane / 16) * 8);
#pragma unroll
      for (int m = 0; m < NMAT; ++m) {
        const int boff = m * kBN + warp_n * 32;  // first B row of this warp's columns
        uint32_t bf[4][2];
        if constexpr (QUANT) {
#pragma unroll
          for (int ni = 0; ni < 4; ++ni) {
            const int8_t* p = bs + (boff + ni * 8 + g) * B_STRIDE + ks + 2 * t4;
            bf[ni][0] = pack2<T>(static_cast<float>(p[0]), static_cast<float>(p[1]));
            bf[ni][1] = pack2<T>(static_cast<float>(p[8]), static_cast<float>(p[9]));
          }
        } else {
#pragma unroll
          for (int np = 0; np < 2; ++np) {
            uint32_t r[4];
            ldmatrix_x4(r, bs + (boff + np * 16 + lane % 8 + (lane / 16) * 8) * B_STRIDE + ks + ((lane / 8) % 2) * 8);
            bf[2 * np][0] = r[0];
            bf[2 * np][1] = r[1];
            bf[2 * np + 1][0] = r[2];
            bf[2 * np + 1][1] = r[3];
          }
        }
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int ni = 0; ni < 4; ++ni) mma_16816<T>(acc[m][mi][ni], af[mi], bf[ni]);
      }
    }
  }
  cp_async_wait<0>();  // only empty groups can be left; drained before the CTA exits

  // Epilogue: C fragment (g, 2t..2t+1) and (g+8, 2t..2t+1) of each 16x8 tile.
  const float* scale_e = QUANT ? a.scale + expert * a.stride_se : nullptr;
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int r = warp_m * 32 + mi * 16 + g + hr * 8;
      const int32_t entry = s_entry[r];
      if (entry >= a.entries) continue;
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int cc = 0; cc < 2; ++cc) {
          const int col = n0 + warp_n * 32 + ni * 8 + 2 * t4 + cc;
          if (col >= a.n_out) continue;
          float v = acc[0][mi][ni][hr * 2 + cc];
          if (QUANT) v *= scale_e[col * a.stride_sn];
          if constexpr (GATE_UP) {
            float u = acc[NMAT - 1][mi][ni][hr * 2 + cc];
            if (QUANT) u *= scale_e[(a.n_out + col) * a.stride_sn];
            const float h = v / (1.f + expf(-v)) * u;  // silu(gate) · up
            static_cast<T*>(a.out)[(pid_m * kBlockM + r) * a.ld_out + col] = from_float<T>(h);
          } else {
            static_cast<float*>(a.out)[entry * a.ld_out + col] = v * a.route_w[entry];
          }
        }
    }
}

}  // namespace
}  // namespace moe
}  // namespace mm1

// ==== host code below: not emulated (tests/cuda_emulation/gen_moe.py cuts here) ====

namespace mm1 {
namespace moe {
namespace {

template <typename T, typename WT, bool GATE_UP>
cudaError_t launch_gemm_on(const GemmArgs& a, cudaStream_t stream) {
  const int64_t num_n = (a.n_out + kBN - 1) / kBN;
  const int64_t blocks = a.num_m * num_n;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  moe_gemm_kernel<T, WT, GATE_UP><<<static_cast<unsigned>(blocks), kGemmThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, typename WT>
cudaError_t run_gemms(const GemmArgs& up, const GemmArgs& down, cudaStream_t stream) {
  cudaError_t err = launch_gemm_on<T, WT, true>(up, stream);
  if (err != cudaSuccess) return err;
  return launch_gemm_on<T, WT, false>(down, stream);
}

constexpr size_t kAlign = 256;
size_t round_up(size_t v) { return (v + kAlign - 1) / kAlign * kAlign; }

struct Workspace {
  size_t chunk_counts, chunk_offsets, counts, padded_start, padded_end, sorted_ids, block_expert, h, rows, total;
};

// Offsets of every buffer in the workspace (each 256-byte aligned).
Workspace workspace_layout(int64_t tokens, int64_t top_k, int64_t experts, int64_t hidden, int64_t inter) {
  const int64_t n = tokens * top_k;
  const int64_t chunks = (n + kAlignChunk - 1) / kAlignChunk;
  const int64_t max_blocks = max_row_tiles(n, experts);
  const int64_t ld_h = (inter + 7) / 8 * 8;  // 16-byte h rows for cp.async
  Workspace w{};
  size_t off = 0;
  auto take = [&](size_t bytes) { const size_t at = off; off += round_up(bytes); return at; };
  w.chunk_counts = take(sizeof(int32_t) * chunks * experts);
  w.chunk_offsets = take(sizeof(int32_t) * chunks * experts);
  w.counts = take(sizeof(int32_t) * experts);
  w.padded_start = take(sizeof(int32_t) * experts);
  w.padded_end = take(sizeof(int32_t) * experts);
  w.sorted_ids = take(sizeof(int32_t) * max_blocks * kBlockM);
  w.block_expert = take(sizeof(int32_t) * max_blocks);
  w.h = take(2 * static_cast<size_t>(max_blocks) * kBlockM * ld_h);
  w.rows = take(sizeof(float) * n * hidden);
  w.total = off;
  return w;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace
}  // namespace moe
}  // namespace mm1

extern "C" MM1_API size_t mm1_fused_moe_workspace_size(mm1_dtype_t dtype, int64_t num_tokens, int64_t top_k,
                                                       int64_t num_experts, int64_t hidden, int64_t inter) {
  (void)dtype;  // h is 16-bit for every supported dtype
  if (num_tokens <= 0 || top_k <= 0 || num_experts <= 0 || hidden <= 0 || inter <= 0) return 0;
  return mm1::moe::workspace_layout(num_tokens, top_k, num_experts, hidden, inter).total;
}

extern "C" MM1_API cudaError_t mm1_fused_moe(
    mm1_dtype_t dtype, int weights_int8,
    const void* x, int64_t stride_xt,
    const void* w13, int64_t stride_w13_e, int64_t stride_w13_n,
    const void* w2, int64_t stride_w2_e, int64_t stride_w2_n,
    const float* w13_scale, int64_t stride_s13_e, int64_t stride_s13_n,
    const float* w2_scale, int64_t stride_s2_e, int64_t stride_s2_n,
    const float* topk_weights, const void* topk_ids, int ids_bytes,
    const void* expert_map, int map_bytes, int64_t map_len,
    void* out, int64_t stride_ot,
    int64_t num_tokens, int64_t top_k, int64_t num_experts, int64_t hidden, int64_t inter,
    void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  using namespace mm1::moe;
  if (dtype != MM1_DTYPE_BFLOAT16 && dtype != MM1_DTYPE_FLOAT16) return cudaErrorInvalidValue;
  // Sizes are int inside the kernels, with a tile of headroom (k0 + kBK, n0 + kBN stay in range);
  // T and k are bounded before their product is formed.
  if (num_tokens < 0 || num_tokens > 0x7fffffff || top_k < 1 || top_k > 0x7fffffff || num_experts < 1 ||
      num_experts > MM1_MOE_MAX_EXPERTS || hidden < 1 || inter < 1 || hidden > 0x7fff0000 || inter > 0x3fff0000 ||
      (ids_bytes != 4 && ids_bytes != 8) ||
      (expert_map != nullptr && ((map_bytes != 4 && map_bytes != 8) || map_len < 1)))
    return cudaErrorInvalidValue;
  if (num_tokens == 0) return cudaSuccess;
  const int64_t n = num_tokens * top_k;
  const int64_t max_blocks = max_row_tiles(n, num_experts);
  if (max_blocks * kBlockM > 0x7fffffff) return cudaErrorInvalidValue;  // int32 slots
  if (!x || !w13 || !w2 || !topk_weights || !topk_ids || !out || !workspace) return cudaErrorInvalidValue;
  if (weights_int8 && (!w13_scale || !w2_scale)) return cudaErrorInvalidValue;
  // One token: its row stride is never used (a [1, hidden] view may carry any stride).
  if (num_tokens == 1) stride_xt = stride_ot = 0;
  // Output rows must not overlap: the combine writes them from different blocks.
  if (num_tokens > 1 && stride_ot < hidden) return cudaErrorInvalidValue;
  // cp.async copies 16-byte vectors: 16-byte aligned bases and rows.
  const int64_t wel = weights_int8 ? 16 : 8;  // weight elements per 16 bytes
  if (!aligned16(x) || !aligned16(w13) || !aligned16(w2) || stride_xt % 8 || stride_w13_e % wel ||
      stride_w13_n % wel || stride_w2_e % wel || stride_w2_n % wel || !aligned16(workspace))
    return cudaErrorInvalidValue;
  // Scalar loads and stores: element-aligned pointers.
  if (!aligned(topk_weights, 4) || !aligned(topk_ids, ids_bytes) || !aligned(out, 2) ||
      (expert_map && !aligned(expert_map, map_bytes)) ||
      (weights_int8 && (!aligned(w13_scale, 4) || !aligned(w2_scale, 4))))
    return cudaErrorInvalidValue;
  const Workspace ws = workspace_layout(num_tokens, top_k, num_experts, hidden, inter);
  if (workspace_bytes < ws.total) return cudaErrorInvalidValue;
  char* base = static_cast<char*>(workspace);
  auto i32 = [&](size_t off) { return reinterpret_cast<int32_t*>(base + off); };

  const AlignBuffers ab{topk_ids, ids_bytes, expert_map, map_bytes, map_len, static_cast<int>(num_experts),
                        n, max_blocks, i32(ws.chunk_counts), i32(ws.chunk_offsets), i32(ws.counts),
                        i32(ws.padded_start), i32(ws.padded_end), i32(ws.sorted_ids), i32(ws.block_expert)};
  cudaError_t err = launch_align(ab, stream);
  if (err != cudaSuccess) return err;

  void* h = base + ws.h;
  float* rows = reinterpret_cast<float*>(base + ws.rows);
  const int64_t ld_h = (inter + 7) / 8 * 8;
  const GemmArgs up{x, stride_xt, w13, stride_w13_e, stride_w13_n, w13_scale, stride_s13_e, stride_s13_n,
                    ab.sorted_ids, ab.block_expert, nullptr, h, ld_h, max_blocks, n,
                    static_cast<int>(inter), static_cast<int>(hidden), static_cast<int>(top_k)};
  const GemmArgs down{h, ld_h, w2, stride_w2_e, stride_w2_n, w2_scale, stride_s2_e, stride_s2_n,
                      ab.sorted_ids, ab.block_expert, topk_weights, rows, hidden, max_blocks, n,
                      static_cast<int>(hidden), static_cast<int>(inter), static_cast<int>(top_k)};
  if (dtype == MM1_DTYPE_BFLOAT16)
    err = weights_int8 ? run_gemms<__nv_bfloat16, int8_t>(up, down, stream)
                       : run_gemms<__nv_bfloat16, __nv_bfloat16>(up, down, stream);
  else
    err = weights_int8 ? run_gemms<__half, int8_t>(up, down, stream) : run_gemms<__half, __half>(up, down, stream);
  if (err != cudaSuccess) return err;
  return launch_combine(dtype, rows, ab, static_cast<int>(top_k), out, stride_ot, num_tokens, hidden, stream);
}
