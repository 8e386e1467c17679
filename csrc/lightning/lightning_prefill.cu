// Chunked lightning-attention prefill on tensor cores: lightning_prefill_kernel (fp32 and fp16
// inputs, mma.sync m16n8k8 TF32, below) and lightning_prefill_bf16_kernel (bf16 inputs,
// mma.sync m16n8k16 bf16 with ldmatrix and cp.async, further down; what M1 runs).
//
// Same math and semantics as mm1_kernels/lightning/triton_prefill.py. Per chunk of m ≤ C = 64
// tokens of one head, with the incoming fp32 state S [D, DV]:
//
//     P     = (Q K^T) ∘ M,            M[j, i] = λ^(j-i) for i ≤ j, else 0
//     O     = P V + diag(λ^(j+1)) Q S
//     S_out = λ^m S + (diag(λ^(m-1-i)) K)^T V
//
// Work decomposition: one 256-thread CTA (8 warps) per (sequence, head, value tile of BV
// columns) walks its sequence chunk by chunk (kWhole). A single sequence then gets H·⌈DV/BV⌉
// CTAs (bf16, BV = 128: 64 at M1's 64 heads, 8 at the 8 heads of one GPU under TP = 8), so with segment_len
// > 0 the sequences are cut into segments and three passes run as in the Triton kernel: the
// local states of the non-last segments from a zero state (kLocal: K^T V only), a scan over
// segment boundaries (lightning_prefill_scan_kernel), and every segment from its incoming state
// (kOutput: the whole kernel), after a one-block kernel has built the segment table on the
// device (lightning_prefill_segments_kernel; see "the segment split" below). The state tile
// lives in the MMA accumulators of the K^T V product (warp w owns state rows [16·S_MT·w, 16·S_MT·(w+1)), all BV columns) and is
// copied to shared memory once per chunk, where it is the B operand of Q S.
// Per chunk, warp w computes the 16×32 score tile (row tile w/2, column half w%2; tiles above
// the diagonal are skipped), then the 16×(BV/2) output tile of the same rows.
//
// Precision (TF32 kernel): every tile is staged in shared memory as fp32. 16-bit inputs are exact in TF32,
// so Q K^T is exact products with fp32 accumulation; the products with an fp32 operand
// (P V, Q S) round that operand to TF32, as the Triton kernel does for fp16; the state update's
// decayed keys are split into TF32 hi + lo for every dtype (two products), so the state keeps
// ~fp32 accuracy (the fp32-state contract, 1e-5; the Triton kernel keeps a bf16 pair there for
// the same reason: mm1_kernels/lightning/triton_prefill.py). For fp32
// inputs every product uses the 3xTF32 split (hi·hi + hi·lo + lo·hi), about fp32 accuracy;
// TF32 alone would miss the 1e-5 contract. Decay powers λ^e (0 ≤ e ≤ 64) are computed once per
// CTA in double and rounded to fp32; no exponent is ever negative. All offsets into q/k/v/o and
// the states are 64-bit.
//
// Shared memory (TF32 kernel): DMAX=128, BV=64 (D ≤ 128): 141 KB; DMAX=256, BV=32 (D ≤ 256):
// 202 KB. The bf16 kernel (Bf16PrefillLayout): DMAX=128, BV=128: 145 KiB (188 KiB in "high");
// DMAX=256, BV=32: 171 KiB (200 KiB in "high").
#include "lightning/lightning_common.cuh"

namespace mm1 {
namespace lightning {
namespace {

constexpr int kChunk = 64;
constexpr int kPrefillThreads = 256;
constexpr int kPrefillWarps = kPrefillThreads / 32;

template <int DMAX, int BV> struct PrefillLayout {
  // Row strides in floats. ≡ 4 (mod 32) for tiles read as A fragments (row g, col t) or as
  // K rows in Q K^T; ≡ 8 (mod 32) for tiles read as B fragments (row t, col g). Either way the
  // 32 lanes of a fragment load hit 32 distinct banks.
  static constexpr int QK_STRIDE = DMAX + 4;
  static constexpr int V_STRIDE = BV + 8;
  static constexpr int P_STRIDE = kChunk + 4;
  static constexpr int S_STRIDE = BV + 8;
  static constexpr int Q_OFF = 0;
  static constexpr int K_OFF = Q_OFF + kChunk * QK_STRIDE;
  static constexpr int V_OFF = K_OFF + kChunk * QK_STRIDE;
  static constexpr int P_OFF = V_OFF + kChunk * V_STRIDE;
  static constexpr int S_OFF = P_OFF + kChunk * P_STRIDE;
  static constexpr int POW_OFF = S_OFF + DMAX * S_STRIDE;
  static constexpr int FLOATS = POW_OFF + 68;  // λ^0 .. λ^64, padded
  static constexpr size_t BYTES = FLOATS * sizeof(float);
  static_assert(QK_STRIDE % 32 == 4 && P_STRIDE % 32 == 4, "A-operand stride");
  static_assert(V_STRIDE % 32 == 8 && S_STRIDE % 32 == 8, "B-operand stride");
};

// dst[j][c] (j < 64, c < cols) = src[j·src_stride + c] for j < rows_valid and c < cols_valid,
// else 0. With vec4, cols and cols_valid are multiples of 4 and src rows are 4-element aligned.
template <typename T>
__device__ __forceinline__ void load_tile(float* dst, int dst_stride, const T* src, int64_t src_stride,
                                          int rows_valid, int cols, int cols_valid, bool vec4) {
  if (vec4) {
    const int groups = cols / 4;
    for (int idx = threadIdx.x; idx < kChunk * groups; idx += kPrefillThreads) {
      const int j = idx / groups, c = (idx - j * groups) * 4;
      float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
      if (j < rows_valid && c < cols_valid) x = load4(src + j * src_stride + c);
      *reinterpret_cast<float4*>(dst + j * dst_stride + c) = x;
    }
  } else {
    for (int idx = threadIdx.x; idx < kChunk * cols; idx += kPrefillThreads) {
      const int j = idx / cols, c = idx - j * cols;
      dst[j * dst_stride + c] = (j < rows_valid && c < cols_valid) ? to_float(src[j * src_stride + c]) : 0.f;
    }
  }
}

// Which pass a prefill CTA runs (a template argument of both prefill kernels):
//  kWhole:  one CTA per (sequence, head, value tile) walks the whole sequence (no split);
//  kLocal:  one CTA per (segment-table row, ...) of a non-last segment computes the segment's own
//           contribution from a zero state (the K^T V updates only; no output) into seg_state;
//  kOutput: one CTA per (segment-table row, ...) walks its segment from the incoming state the
//           scan left in seg_state, writes o, and the final state if it is its sequence's last.
enum PrefillPass : int { kWhole = 0, kLocal = 1, kOutput = 2 };

// Tokens [bos, eos) of sequence n and its batch row, clamped like the Triton path: offsets
// outside [0, T] cannot fault, and a decreasing pair is an empty sequence.
__device__ __forceinline__ void seq_span(const PrefillArgs& a, int64_t n, int64_t& row, int64_t& bos, int64_t& eos) {
  if (a.cu_seqlens) {
    row = 0;
    bos = min(max(load_index(a.cu_seqlens, a.cu_index_bytes, n), int64_t(0)), a.seqlen);
    eos = max(min(max(load_index(a.cu_seqlens, a.cu_index_bytes, n + 1), int64_t(0)), a.seqlen), bos);
  } else {
    row = n;
    bos = 0;
    eos = a.seqlen;
  }
}

// What this CTA (blockIdx.x: a sequence for kWhole, a segment-table row otherwise) walks, where
// its incoming state comes from (in: [D, DV] rows of stride DV at column v0, or null for zeros)
// and where its last state goes (out, or null). False: nothing to do (an idle table row, or the
// last segment in the local pass: the scan never needs its local state).
struct PrefillWork {
  int64_t row, bos, eos;
  const float* in;
  float* out;
};
template <int PASS>
__device__ __forceinline__ bool prefill_work(const PrefillArgs& a, int h, int v0, PrefillWork& w) {
  const int64_t blk = blockIdx.x;
  const int64_t head_state = static_cast<int64_t>(a.head_dim) * a.value_dim;
  if (PASS == kWhole) {
    seq_span(a, blk, w.row, w.bos, w.eos);
    const int64_t off = (blk * a.heads + h) * head_state + v0;
    w.in = a.init ? a.init + off : nullptr;
    w.out = a.final_state ? a.final_state + off : nullptr;
    return true;
  }
  const int64_t* r = a.seg_table + 4 * blk;
  const int64_t seq = r[0];
  const bool last = r[3] != 0;
  if (seq < 0 || (PASS == kLocal && last)) return false;
  w.row = a.cu_seqlens ? 0 : seq;
  w.bos = r[1];
  w.eos = r[2];
  float* seg = a.seg_state + (blk * a.heads + h) * head_state + v0;
  if (PASS == kLocal) {
    w.in = nullptr;
    w.out = seg;
  } else {
    w.in = seg;
    w.out = (last && a.final_state) ? a.final_state + (seq * a.heads + h) * head_state + v0 : nullptr;
  }
  return true;
}

template <typename T, int DMAX, int BV, int PASS>
__global__ void __launch_bounds__(kPrefillThreads, 1)
lightning_prefill_kernel(const PrefillArgs a) {
  using L = PrefillLayout<DMAX, BV>;
  constexpr bool SPLIT = std::is_same<T, float>::value;
  constexpr int S_MT = DMAX / 16 / kPrefillWarps;  // state row tiles per warp
  constexpr int S_NT = BV / 8;                     // state column tiles
  constexpr int O_NT = BV / 16;                    // output column tiles per warp (2 warps per row tile)
  static_assert(S_MT >= 1 && O_NT >= 1, "tile shape");

  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  float* q_s = smem + L::Q_OFF;
  float* k_s = smem + L::K_OFF;
  float* v_s = smem + L::V_OFF;
  float* p_s = smem + L::P_OFF;
  float* s_s = smem + L::S_OFF;
  float* pow_s = smem + L::POW_OFF;

  const int h = blockIdx.y;
  const int v0 = blockIdx.z * BV;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int D = a.head_dim, DV = a.value_dim;
  const int DP = (D + 7) & ~7;    // MMA k-extent over D
  const int DQ = (D + 15) & ~15;  // columns of Q/K staged (state row tiles read up to here)
  const int v_valid = min(BV, DV - v0);

  constexpr bool OUT = PASS != kLocal;  // the local pass computes no output (no Q K^T, P V, Q S)
  PrefillWork w;
  if (!prefill_work<PASS>(a, h, v0, w)) return;  // uniform over the block: before any barrier
  const int64_t row = w.row, bos = w.bos, eos = w.eos;

  const float slope = a.slopes[h];
  for (int e = tid; e <= kChunk; e += kPrefillThreads) pow_s[e] = decay_pow(slope, e);

  // The state tile: st[mi][ni] is the C fragment of rows (warp·S_MT + mi)·16, columns ni·8.
  float st[S_MT][S_NT][4];
#pragma unroll
  for (int mi = 0; mi < S_MT; ++mi)
#pragma unroll
    for (int ni = 0; ni < S_NT; ++ni)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int d = (warp * S_MT + mi) * 16 + g + (r >= 2 ? 8 : 0);
        const int c = ni * 8 + 2 * t + (r & 1);
        st[mi][ni][r] = (w.in && d < D && c < v_valid) ? w.in[static_cast<int64_t>(d) * DV + c] : 0.f;
      }

  auto store_state_smem = [&]() {
#pragma unroll
    for (int mi = 0; mi < S_MT; ++mi)
#pragma unroll
      for (int ni = 0; ni < S_NT; ++ni) {
        const int d = (warp * S_MT + mi) * 16 + g;
        const int c = ni * 8 + 2 * t;
        *reinterpret_cast<float2*>(s_s + d * L::S_STRIDE + c) = make_float2(st[mi][ni][0], st[mi][ni][1]);
        *reinterpret_cast<float2*>(s_s + (d + 8) * L::S_STRIDE + c) = make_float2(st[mi][ni][2], st[mi][ni][3]);
      }
  };
  if (OUT) store_state_smem();

  const T* q_base = static_cast<const T*>(a.q) + row * a.sqb + h * a.sqh;
  const T* k_base = static_cast<const T*>(a.k) + row * a.skb + h * a.skh;
  const T* v_base = static_cast<const T*>(a.v) + row * a.svb + h * a.svh + v0;
  T* o_base = static_cast<T*>(a.o) + row * a.sob + h * a.soh + v0;

  const int mt = warp >> 1;   // token row tile of this warp's scores and outputs
  const int half = warp & 1;  // which half of the columns
  const int r0 = mt * 16;

  for (int64_t t0 = bos; t0 < eos; t0 += kChunk) {
    const int m = static_cast<int>(min(eos - t0, static_cast<int64_t>(kChunk)));
    if (OUT) load_tile(q_s, L::QK_STRIDE, q_base + t0 * a.sqt, a.sqt, m, DQ, D, a.vec4);
    load_tile(k_s, L::QK_STRIDE, k_base + t0 * a.skt, a.skt, m, DQ, D, a.vec4);
    load_tile(v_s, L::V_STRIDE, v_base + t0 * a.svt, a.svt, m, BV, v_valid, a.vec4);
    __syncthreads();

    if constexpr (OUT) {  // steps 1 and 2: the output (not in the local pass)
      // 1. Decayed causal scores P = (Q K^T) ∘ M for rows [r0, r0+16), columns [32·half, +32).
      {
        float acc[4][4] = {};
        for (int k0 = 0; k0 < DP; k0 += 8) {
          Tf32Frag<4, SPLIT> fa;
          fa.set(0, q_s[(r0 + g) * L::QK_STRIDE + k0 + t]);
          fa.set(1, q_s[(r0 + g + 8) * L::QK_STRIDE + k0 + t]);
          fa.set(2, q_s[(r0 + g) * L::QK_STRIDE + k0 + t + 4]);
          fa.set(3, q_s[(r0 + g + 8) * L::QK_STRIDE + k0 + t + 4]);
#pragma unroll
          for (int ni = 0; ni < 4; ++ni) {
            const int n0 = half * 32 + ni * 8;
            if (n0 < r0 + 16) {  // tiles wholly above the diagonal stay zero
              Tf32Frag<2, SPLIT> fb;
              fb.set(0, k_s[(n0 + g) * L::QK_STRIDE + k0 + t]);
              fb.set(1, k_s[(n0 + g) * L::QK_STRIDE + k0 + t + 4]);
              mma<SPLIT>(acc[ni], fa, fb);
            }
          }
        }
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int j = r0 + g + (r >= 2 ? 8 : 0);
            const int i = half * 32 + ni * 8 + 2 * t + (r & 1);
            p_s[j * L::P_STRIDE + i] = (i <= j && j < m) ? acc[ni][r] * pow_s[j - i] : 0.f;
          }
      }
      __syncthreads();

      // 2. O = P V + diag(λ^(j+1)) Q S_in for rows [r0, r0+16), columns [half·BV/2, +BV/2).
      if (r0 < m) {
        float pv[O_NT][4] = {};
        float qs[O_NT][4] = {};
        const int c_base = half * (BV / 2);
        for (int k0 = 0; k0 < r0 + 16; k0 += 8) {  // P is zero beyond the diagonal
          Tf32Frag<4, SPLIT> fa;
          fa.set(0, p_s[(r0 + g) * L::P_STRIDE + k0 + t]);
          fa.set(1, p_s[(r0 + g + 8) * L::P_STRIDE + k0 + t]);
          fa.set(2, p_s[(r0 + g) * L::P_STRIDE + k0 + t + 4]);
          fa.set(3, p_s[(r0 + g + 8) * L::P_STRIDE + k0 + t + 4]);
#pragma unroll
          for (int ni = 0; ni < O_NT; ++ni) {
            const int n0 = c_base + ni * 8;
            Tf32Frag<2, SPLIT> fb;
            fb.set(0, v_s[(k0 + t) * L::V_STRIDE + n0 + g]);
            fb.set(1, v_s[(k0 + t + 4) * L::V_STRIDE + n0 + g]);
            mma<SPLIT>(pv[ni], fa, fb);
          }
        }
        for (int k0 = 0; k0 < DP; k0 += 8) {
          Tf32Frag<4, SPLIT> fa;
          fa.set(0, q_s[(r0 + g) * L::QK_STRIDE + k0 + t]);
          fa.set(1, q_s[(r0 + g + 8) * L::QK_STRIDE + k0 + t]);
          fa.set(2, q_s[(r0 + g) * L::QK_STRIDE + k0 + t + 4]);
          fa.set(3, q_s[(r0 + g + 8) * L::QK_STRIDE + k0 + t + 4]);
#pragma unroll
          for (int ni = 0; ni < O_NT; ++ni) {
            const int n0 = c_base + ni * 8;
            Tf32Frag<2, SPLIT> fb;
            fb.set(0, s_s[(k0 + t) * L::S_STRIDE + n0 + g]);
            fb.set(1, s_s[(k0 + t + 4) * L::S_STRIDE + n0 + g]);
            mma<SPLIT>(qs[ni], fa, fb);
          }
        }
#pragma unroll
        for (int ni = 0; ni < O_NT; ++ni)
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int j = r0 + g + (r >= 2 ? 8 : 0);
            const int c = c_base + ni * 8 + 2 * t + (r & 1);
            if (j < m && c < v_valid)
              o_base[(t0 + j) * a.sot + c] = from_float<T>(fmaf(pow_s[j + 1], qs[ni][r], pv[ni][r]));
          }
      }
    }

    // 3. S = λ^m S + (diag(λ^(m-1-i)) K)^T V, accumulated in the state fragments.
    {
      const float lam_m = pow_s[m];
#pragma unroll
      for (int mi = 0; mi < S_MT; ++mi)
#pragma unroll
        for (int ni = 0; ni < S_NT; ++ni)
#pragma unroll
          for (int r = 0; r < 4; ++r) st[mi][ni][r] *= lam_m;
      for (int k0 = 0; k0 < m; k0 += 8) {  // rows past m are zero-filled; their decay is 0 too
        const int i0 = k0 + t, i1 = k0 + t + 4;
        const float kd0 = i0 < m ? pow_s[m - 1 - i0] : 0.f;
        const float kd1 = i1 < m ? pow_s[m - 1 - i1] : 0.f;
        Tf32Frag<2, SPLIT> fb[S_NT];
#pragma unroll
        for (int ni = 0; ni < S_NT; ++ni) {
          fb[ni].set(0, v_s[i0 * L::V_STRIDE + ni * 8 + g]);
          fb[ni].set(1, v_s[i1 * L::V_STRIDE + ni * 8 + g]);
        }
#pragma unroll
        for (int mi = 0; mi < S_MT; ++mi) {
          const int d0 = (warp * S_MT + mi) * 16;
          if (d0 < D) {  // row tiles wholly past D stay zero
            // The decayed keys are fp32 values: split into hi + lo for every input dtype, so
            // the state keeps ~fp32 accuracy (the Triton kernel's bf16 pair, same reason).
            Tf32Frag<4, true> fa;
            fa.set(0, k_s[i0 * L::QK_STRIDE + d0 + g] * kd0);
            fa.set(1, k_s[i0 * L::QK_STRIDE + d0 + g + 8] * kd0);
            fa.set(2, k_s[i1 * L::QK_STRIDE + d0 + g] * kd1);
            fa.set(3, k_s[i1 * L::QK_STRIDE + d0 + g + 8] * kd1);
#pragma unroll
            for (int ni = 0; ni < S_NT; ++ni) mma_split_a<SPLIT>(st[mi][ni], fa, fb[ni]);
          }
        }
      }
    }
    __syncthreads();     // every read of this chunk's tiles and of S_in is done
    if (OUT) store_state_smem();  // S_in of the next chunk (visible after its first barrier)
  }

  if (w.out) {
#pragma unroll
    for (int mi = 0; mi < S_MT; ++mi)
#pragma unroll
      for (int ni = 0; ni < S_NT; ++ni)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int d = (warp * S_MT + mi) * 16 + g + (r >= 2 ? 8 : 0);
          const int c = ni * 8 + 2 * t + (r & 1);
          if (d < D && c < v_valid) w.out[static_cast<int64_t>(d) * DV + c] = st[mi][ni][r];
        }
  }
}

// ---- bf16 inputs: mma.sync m16n8k16 on bf16 tensor cores --------------------------------------
//
// Same decomposition as above (one CTA per (sequence, head, value tile), 8 warps, the state
// tile in the K^T V accumulators), with the tiles staged in shared memory as bf16:
//  - q/k/v chunk tiles: two stages; chunk c+1 is loaded with 16-byte cp.async while chunk c is
//    computed (ASYNC, when D, Dv, strides and base pointers allow 16-byte rows; otherwise
//    element loads into the same stage, synchronous, same barriers);
//  - every MMA operand comes from shared memory through ldmatrix.x4 (.trans where the tile is
//    stored k-major: V and the state in P V / Q S, and K as the A operand K^T of the state
//    update); rows are padded by 16 bytes so the 8 rows of each 8x8 matrix hit distinct banks.
// Precision (the Triton kernel's modes for bf16, see its module docstring): Q K^T takes the
// inputs as they are (exact products, fp32 accumulation); "default" rounds the decayed scores P
// and the state in Q S to bf16 once (P when written to shared memory, S when copied there at the
// end of every chunk); "high" (HIGH) also stores their residuals x - bf16(x) rounded to bf16 in
// a second tile and issues the lo products first (two MMAs each: ~16 significant bits). The
// state update's decayed keys enter as a bf16 pair hi + lo in both (two MMAs), so the fp32 state
// keeps the 1e-5 contract. fp16 stays on the TF32 kernel
// (as in Triton: an fp16 copy of the state could overflow, and an fp16 lo part underflows).
// Value tiles: BV = 128 at D <= 128, so at M1's D = Dv = 128 one CTA owns a head's whole state
// (Q K^T once per chunk and head; at BV = 64 the two value-tile CTAs each computed it, 1.31x
// the count instead of 1.21x) at 250-255 registers, no spills: the state update streams its V
// fragments one 16-column pair at a time. BV = 32 at D <= 256 (the state tile has to fit).
// Tensor work issued per chunk and head, D = Dv = 128 (C = 64): Q K^T and P V at 16x16 tile
// granularity of the causal triangle (10 of 16 tiles), Q S once, K^T V twice (the pair):
// 0.625 (2C²D + 2C²Dv) + 2CDDv + 4CDDv = 1.21x the counted 4C²D + 4CD² (Triton: 4/3, it
// computes the full Q K^T and P V); "high" adds 0.625·2C²Dv + 2CDDv: 1.65x (Triton: 11/6); the
// local pass of the split issues only the K^T V pair, 4CDDv (0.67x) per chunk of a non-last
// segment. The k-steps over D run to DMAX without a test: Q and K are staged to DMAX columns
// and the state to DMAX rows, zero past D (products of zero; none at D = DMAX).
// The loop over full chunks (m = 64) is its own instantiation of the chunk step (FULL): its
// decays live in registers and no row is tested against m; a sequence's (segment's) last
// partial chunk runs the general step once after it, as FlashAttention-2 peels its masked
// blocks. SASS (sm_90a, <128, 128, true, 0, false>): the chunk loop is straight-line code of
// 256 HMMA.16816, 120 LDSM and ~4.9 instructions per HMMA (FA2's forward loop: 3.67);
// python -m profiles.static reports the counts.

template <int DMAX, int BV, bool HIGH> struct Bf16PrefillLayout {
  // Row pitches in bf16 elements: a multiple of 8 (16-byte rows for cp.async and ldmatrix) whose
  // byte size is an odd multiple of 16, so the 8 row addresses of an 8x8 matrix fall into 8
  // distinct 16-byte bank groups (conflict-free ldmatrix without a swizzle).
  static constexpr int QK_LD = DMAX + 8;
  static constexpr int V_LD = BV + 8;
  static constexpr int P_LD = kChunk + 8;
  static constexpr int S_LD = BV + 8;
  static constexpr int STAGE = 2 * kChunk * QK_LD + kChunk * V_LD;  // q, k, v of one chunk
  static constexpr int Q_OFF = 0;                                   // + stage * STAGE
  static constexpr int K_OFF = kChunk * QK_LD;
  static constexpr int V_OFF = 2 * kChunk * QK_LD;
  static constexpr int P_OFF = 2 * STAGE;
  static constexpr int S_OFF = P_OFF + kChunk * P_LD;
  // HIGH ("high" precision): the lo halves of the bf16 pairs of P and of the state.
  static constexpr int P_LO_OFF = S_OFF + DMAX * S_LD;
  static constexpr int S_LO_OFF = P_LO_OFF + (HIGH ? kChunk * P_LD : 0);
  static constexpr int POW_OFF = S_LO_OFF + (HIGH ? DMAX * S_LD : 0);  // fp32 λ^0 .. λ^64 from here
  static constexpr size_t BYTES = POW_OFF * 2 + 68 * sizeof(float);
  static_assert((QK_LD * 2 / 16) % 2 == 1 && (V_LD * 2 / 16) % 2 == 1 && (P_LD * 2 / 16) % 2 == 1 &&
                    (S_LD * 2 / 16) % 2 == 1 && QK_LD % 8 == 0 && V_LD % 8 == 0,
                "row pitch: an odd number of 16-byte units");
  static_assert(POW_OFF % 8 == 0 && STAGE % 8 == 0 && S_LO_OFF % 8 == 0, "16-byte aligned tiles");
};

// dst[j][c] (j < 64, c < COLS) = src[j·src_stride + c] for j < rows_valid and c < cols_valid,
// else 0. ASYNC: 16-byte cp.async (cols_valid a multiple of 8, src rows 16-byte aligned;
// zero-filled through src_bytes = 0); the caller commits and waits. Otherwise element copies.
template <int COLS, bool ASYNC>
__device__ __forceinline__ void load_tile_bf16(__nv_bfloat16* dst, int dst_ld, const __nv_bfloat16* src,
                                               int64_t src_stride, int rows_valid, int cols_valid) {
  if (ASYNC) {
    // Piece `it` of this thread: row j0 + it·ROWS, 16 bytes at column c. The source pointer
    // steps by ROWS rows (64-bit adds, no per-piece multiply). src_bytes = 0 reads nothing
    // (zero-fills), so a masked piece's address may lie outside the tensor.
    constexpr int groups = COLS / 8;                   // 16-byte pieces per row
    constexpr int ROWS = kPrefillThreads / groups;     // rows per trip of the whole block
    static_assert(kPrefillThreads % groups == 0 && kChunk % ROWS == 0, "whole trips");
    const int j0 = threadIdx.x / groups, c = (threadIdx.x % groups) * 8;
    const bool col_ok = c < cols_valid;
    const __nv_bfloat16* p = src + j0 * src_stride + c;
    const int64_t step = ROWS * src_stride;
#pragma unroll
    for (int it = 0; it < kChunk / ROWS; ++it) {
      const int j = j0 + it * ROWS;
      cp_async16(dst + j * dst_ld + c, p, (col_ok && j < rows_valid) ? 16 : 0);
      p += step;
    }
  } else {
    for (int idx = threadIdx.x; idx < kChunk * COLS; idx += kPrefillThreads) {
      const int j = idx / COLS, c = idx - j * COLS;
      dst[j * dst_ld + c] = (j < rows_valid && c < cols_valid) ? src[j * src_stride + c] : __float2bfloat16_rn(0.f);
    }
  }
}

// ASYNC = a.async16, a template argument so that the cp.async instantiation (the one M1 runs)
// carries no code of the element-copy fallback.
// x0, x1 rounded to bf16 into hi; with HIGH also their residuals x - hi (exact in fp32, then
// rounded to bf16) into lo: the pair hi + lo keeps ~16 significant bits.
template <bool HIGH>
__device__ __forceinline__ void store_bf16_pair(__nv_bfloat16* hi, __nv_bfloat16* lo, float x0, float x1) {
  const uint32_t h = pack_bf16x2(x0, x1);
  *reinterpret_cast<uint32_t*>(hi) = h;
  if (HIGH) {
    const float2 y = unpack_bf16x2(h);
    *reinterpret_cast<uint32_t*>(lo) = pack_bf16x2(x0 - y.x, x1 - y.y);
  }
}

// HIGH: precision "high" (the decayed scores in P V and the state in Q S as bf16 pairs, two
// MMAs each; see the comment above Bf16PrefillLayout).
template <int DMAX, int BV, bool ASYNC, int PASS, bool HIGH>
__global__ void __launch_bounds__(kPrefillThreads, 1)
lightning_prefill_bf16_kernel(const PrefillArgs a) {
  using L = Bf16PrefillLayout<DMAX, BV, HIGH>;
  static_assert(!(HIGH && PASS == kLocal), "the local pass has no Q S or P V: no precision variants");
  constexpr int P_LO = L::P_LO_OFF - L::P_OFF, S_LO = L::S_LO_OFF - L::S_OFF;  // lo tile = hi tile + these
  using T = __nv_bfloat16;
  constexpr int S_MT = DMAX / 16 / kPrefillWarps;  // state row tiles per warp
  constexpr int S_NT = BV / 8;                     // state column tiles
  constexpr int O_NP = BV / 32;                    // output column tile pairs per warp (2 warps per row tile)
  static_assert(S_MT >= 1 && O_NP >= 1 && S_NT % 2 == 0, "tile shape");

  extern __shared__ float4 smem4[];
  T* smem = reinterpret_cast<T*>(smem4);
  T* p_s = smem + L::P_OFF;
  T* s_s = smem + L::S_OFF;
  float* pow_s = reinterpret_cast<float*>(smem + L::POW_OFF);

  const int h = blockIdx.y;
  const int v0 = blockIdx.z * BV;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int D = a.head_dim, DV = a.value_dim;
  const int v_valid = min(BV, DV - v0);
  // ldmatrix.x4 row address of this lane: row lane % 8 of matrix lane / 8. ld_r16/ld_c16 place
  // matrices 1 and 3 8 rows further (A tiles: a1, a3 are rows g+8); ld_c8/ld_r8 place matrices
  // 2 and 3 8 columns (8 rows) further.
  const int lr = lane & 7, m1 = (lane >> 3) & 1, m2 = lane >> 4;

  constexpr bool OUT = PASS != kLocal;  // the local pass computes no output (no Q K^T, P V, Q S)
  PrefillWork w;
  if (!prefill_work<PASS>(a, h, v0, w)) return;  // uniform over the block: before any barrier
  const int64_t row = w.row, bos = w.bos, eos = w.eos;

  const float slope = a.slopes[h];
  for (int e = tid; e <= kChunk; e += kPrefillThreads) pow_s[e] = decay_pow(slope, e);

  // The state tile: st[mi][ni] is the C fragment of rows (warp·S_MT + mi)·16, columns ni·8.
  float st[S_MT][S_NT][4];
#pragma unroll
  for (int mi = 0; mi < S_MT; ++mi)
#pragma unroll
    for (int ni = 0; ni < S_NT; ++ni)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int d = (warp * S_MT + mi) * 16 + g + (r >= 2 ? 8 : 0);
        const int c = ni * 8 + 2 * t + (r & 1);
        st[mi][ni][r] = (w.in && d < D && c < v_valid) ? w.in[static_cast<int64_t>(d) * DV + c] : 0.f;
      }

  // The state as the B operand of Q S: rounded to bf16 once ("default"), or a bf16 pair (HIGH).
  auto store_state_smem = [&]() {
#pragma unroll
    for (int mi = 0; mi < S_MT; ++mi)
#pragma unroll
      for (int ni = 0; ni < S_NT; ++ni) {
        const int d = (warp * S_MT + mi) * 16 + g;
        const int c = ni * 8 + 2 * t;
        T* s0 = s_s + d * L::S_LD + c;
        T* s1 = s_s + (d + 8) * L::S_LD + c;
        store_bf16_pair<HIGH>(s0, s0 + S_LO, st[mi][ni][0], st[mi][ni][1]);
        store_bf16_pair<HIGH>(s1, s1 + S_LO, st[mi][ni][2], st[mi][ni][3]);
      }
  };
  if (OUT) store_state_smem();

  const T* q_base = static_cast<const T*>(a.q) + row * a.sqb + h * a.sqh;
  const T* k_base = static_cast<const T*>(a.k) + row * a.skb + h * a.skh;
  const T* v_base = static_cast<const T*>(a.v) + row * a.svb + h * a.svh + v0;
  T* o_base = static_cast<T*>(a.o) + row * a.sob + h * a.soh + v0;

  auto load_chunk = [&](int64_t t0, int stage) {
    const int m = static_cast<int>(min(eos - t0, static_cast<int64_t>(kChunk)));
    T* base = smem + stage * L::STAGE;
    // All DMAX columns, zero past D: the k-steps over D run to DMAX without a test (products of
    // zero past D; none at M1's D = DMAX), which keeps the chunk loop free of branches.
    if (OUT) load_tile_bf16<DMAX, ASYNC>(base + L::Q_OFF, L::QK_LD, q_base + t0 * a.sqt, a.sqt, m, D);
    load_tile_bf16<DMAX, ASYNC>(base + L::K_OFF, L::QK_LD, k_base + t0 * a.skt, a.skt, m, D);
    load_tile_bf16<BV, ASYNC>(base + L::V_OFF, L::V_LD, v_base + t0 * a.svt, a.svt, m, v_valid);
  };

  const int mt = warp >> 1;   // token row tile of this warp's scores and outputs
  const int half = warp & 1;  // which half of the columns
  const int r0 = mt * 16;
  const int c_base = half * (BV / 2);  // this warp's output columns

  // This lane's ldmatrix row addresses (stage 0; + stage·STAGE·2 bytes for stage 1), so that
  // every k-step is a compile-time offset. A tiles (Q rows, P rows): matrices 1, 3 are 8 rows
  // further (a1, a3), 2, 3 are 8 columns further. K as the B operand of Q K^T: matrices 1, 3 are
  // 8 columns (k) further, 2, 3 are 8 rows (n) further. k-major B tiles (V, S) read with .trans:
  // 1, 3 are 8 rows (k) further, 2, 3 are 8 columns (n) further. K^T as the A operand of the
  // state update (.trans of the token-major K tile): 1, 3 are 8 columns (d) further, 2, 3 are
  // 8 rows (tokens) further.
  const uint32_t q_a = smem_u32(smem + L::Q_OFF + (r0 + lr + 8 * m1) * L::QK_LD + 8 * m2);
  const uint32_t k_b = smem_u32(smem + L::K_OFF + (half * 32 + lr + 8 * m2) * L::QK_LD + 8 * m1);
  const uint32_t k_at = smem_u32(smem + L::K_OFF + (lr + 8 * m2) * L::QK_LD + 8 * m1);
  const uint32_t v_b = smem_u32(smem + L::V_OFF + (lr + 8 * m1) * L::V_LD + 8 * m2);
  const uint32_t p_a = smem_u32(p_s + (r0 + lr + 8 * m1) * L::P_LD + 8 * m2);
  const uint32_t s_b = smem_u32(s_s + (lr + 8 * m1) * L::S_LD + c_base + 8 * m2);
  constexpr uint32_t B2 = sizeof(T);  // bytes per element

  // Decays that are the same in every full chunk, kept in registers: the loop over full chunks
  // (FULL below) then reads no decay from shared memory and tests no row against m, as
  // FlashAttention-2 peels its masked blocks off its main loop. p_dec: λ^(j-i) of this lane's
  // score elements (0 above the diagonal); o_dec: λ^(j+1) of its two output rows; k_dec:
  // λ^(63-i) of its key columns in each 16-token step of the state update.
  __syncthreads();  // pow_s is written
  float p_dec[4][2][2], o_dec[2], k_dec[kChunk / 16][4];
#pragma unroll
  for (int ni = 0; ni < 4; ++ni)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int j = r0 + g + 8 * hr, i = half * 32 + ni * 8 + 2 * t + e;
        p_dec[ni][hr][e] = i <= j ? pow_s[j - i] : 0.f;
      }
  o_dec[0] = pow_s[r0 + g + 1];
  o_dec[1] = pow_s[r0 + g + 9];
#pragma unroll
  for (int s16 = 0; s16 < kChunk / 16; ++s16)
#pragma unroll
    for (int e = 0; e < 4; ++e) k_dec[s16][e] = pow_s[kChunk - 1 - (s16 * 16 + 2 * t + (e & 1) + (e >= 2 ? 8 : 0))];
  const float lam_chunk = pow_s[kChunk];

  if (bos < eos) load_chunk(bos, 0);
  cp_async_commit();
  int stage = 0;
  int64_t t0 = bos;
  // One chunk: FULL (m = 64) for every chunk but a sequence's (or segment's) last partial one.
  auto chunk_step = [&](auto full) {
    constexpr bool FULL = decltype(full)::value;
    const int m = FULL ? kChunk : static_cast<int>(min(eos - t0, static_cast<int64_t>(kChunk)));
    // Prefetch chunk c+1 into the other stage (last read in chunk c-1, before its final
    // barrier). Every thread commits one group per chunk, empty or not, so waiting for all but
    // the newest group always means "chunk c has landed".
    if (t0 + kChunk < eos) load_chunk(t0 + kChunk, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();  // chunk c's tiles (every thread's copies) and S_in are visible
    const uint32_t so = stage * (L::STAGE * B2);  // this chunk's stage

    if constexpr (OUT) {  // steps 1 and 2: the output (not in the local pass)
      // 1. Decayed causal scores P = (Q K^T) ∘ M, rows [r0, r0+16), columns [32·half, +32), in
      //    16-column pairs of n-tiles; pairs wholly above the diagonal stay zero.
      {
        float acc[4][4] = {};
#pragma unroll
        for (int k0 = 0; k0 < DMAX; k0 += 16) {
          {  // past D: zero columns of Q and K, zero rows of the state (see load_chunk)
            uint32_t fa[4];
            ldsm_x4(fa, q_a + so + k0 * B2);
#pragma unroll
            for (int np = 0; np < 2; ++np) {
              const int n0 = half * 32 + np * 16;
              if (n0 <= r0) {
                // K rows n0.. as B (n = key, k = d): matrices (n0, k0) (n0, k0+8) (n0+8, k0) (n0+8, k0+8).
                uint32_t fb[4];
                ldsm_x4(fb, k_b + so + (np * 16 * L::QK_LD + k0) * B2);
                const uint32_t b0[2] = {fb[0], fb[1]}, b1[2] = {fb[2], fb[3]};
                mma_bf16(acc[2 * np], fa, b0);
                mma_bf16(acc[2 * np + 1], fa, b1);
              }
            }
          }
        }
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {
            const int j = r0 + g + 8 * hr;
            const int i = half * 32 + ni * 8 + 2 * t;
            // A select where p_dec is 0 (above the diagonal, or a decay that underflowed), not a
            // multiply by that 0: a NaN or inf in a later token's k must not reach an earlier
            // token's output through 0 · NaN (the Triton and TF32 kernels select too). Testing
            // p_dec, which is live anyway, rather than i <= j keeps 16 predicates out of the
            // register budget (the i <= j form spilled). Rows j >= m of a partial chunk need no
            // test: their Q rows are zero-filled and they are never stored.
            const float x0 = p_dec[ni][hr][0] != 0.f ? acc[ni][2 * hr] * p_dec[ni][hr][0] : 0.f;
            const float x1 = p_dec[ni][hr][1] != 0.f ? acc[ni][2 * hr + 1] * p_dec[ni][hr][1] : 0.f;
            T* pj = p_s + j * L::P_LD + i;
            store_bf16_pair<HIGH>(pj, pj + P_LO, x0, x1);
          }
      }
      __syncthreads();

      // 2. O = P V + diag(λ^(j+1)) Q S_in for rows [r0, r0+16), columns [half·BV/2, +BV/2).
      if (FULL || r0 < m) {
        float pv[2 * O_NP][4] = {};
        float qs[2 * O_NP][4] = {};
#pragma unroll
        for (int k0 = 0; k0 < kChunk; k0 += 16) {
          if (k0 <= r0) {  // P is zero beyond the diagonal
            uint32_t fa[4], fa_lo[4];
            ldsm_x4(fa, p_a + k0 * B2);
            if (HIGH) ldsm_x4(fa_lo, p_a + (P_LO + k0) * B2);
#pragma unroll
            for (int np = 0; np < O_NP; ++np) {
              // V rows k0.. (k-major) as B, transposed: matrices (k0, n0) (k0+8, n0) (k0, n0+8) (k0+8, n0+8).
              uint32_t fb[4];
              ldsm_x4_trans(fb, v_b + so + (k0 * L::V_LD + c_base + np * 16) * B2);
              const uint32_t b0[2] = {fb[0], fb[1]}, b1[2] = {fb[2], fb[3]};
              if (HIGH) {  // the small lo products first
                mma_bf16(pv[2 * np], fa_lo, b0);
                mma_bf16(pv[2 * np + 1], fa_lo, b1);
              }
              mma_bf16(pv[2 * np], fa, b0);
              mma_bf16(pv[2 * np + 1], fa, b1);
            }
          }
        }
#pragma unroll
        for (int k0 = 0; k0 < DMAX; k0 += 16) {
          {  // past D: zero columns of Q and K, zero rows of the state (see load_chunk)
            uint32_t fa[4];
            ldsm_x4(fa, q_a + so + k0 * B2);
#pragma unroll
            for (int np = 0; np < O_NP; ++np) {
              uint32_t fb[4];
              if (HIGH) {
                ldsm_x4_trans(fb, s_b + (S_LO + k0 * L::S_LD + np * 16) * B2);
                const uint32_t l0[2] = {fb[0], fb[1]}, l1[2] = {fb[2], fb[3]};
                mma_bf16(qs[2 * np], fa, l0);
                mma_bf16(qs[2 * np + 1], fa, l1);
              }
              ldsm_x4_trans(fb, s_b + (k0 * L::S_LD + np * 16) * B2);
              const uint32_t b0[2] = {fb[0], fb[1]}, b1[2] = {fb[2], fb[3]};
              mma_bf16(qs[2 * np], fa, b0);
              mma_bf16(qs[2 * np + 1], fa, b1);
            }
          }
        }
#pragma unroll
        for (int ni = 0; ni < 2 * O_NP; ++ni)
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int j = r0 + g + (r >= 2 ? 8 : 0);
            const int c = c_base + ni * 8 + 2 * t + (r & 1);
            if ((FULL || j < m) && c < v_valid)
              o_base[(t0 + j) * a.sot + c] = __float2bfloat16_rn(fmaf(o_dec[r >= 2], qs[ni][r], pv[ni][r]));
          }
      }
    }

    // 3. S = λ^m S + (diag(λ^(m-1-i)) K)^T V, accumulated in the state fragments.
    {
      const float lam_m = FULL ? lam_chunk : pow_s[m];
#pragma unroll
      for (int mi = 0; mi < S_MT; ++mi)
#pragma unroll
        for (int ni = 0; ni < S_NT; ++ni)
#pragma unroll
          for (int r = 0; r < 4; ++r) st[mi][ni][r] *= lam_m;
#pragma unroll
      for (int i0 = 0; i0 < kChunk; i0 += 16) {
        if (FULL || i0 < m) {  // rows past m are zero-filled; their decay is 0 too
          // Decays of this lane's A columns (tokens) i0+2t, +1 (a0, a1) and i0+2t+8, +9 (a2, a3).
          float kd[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = i0 + 2 * t + (e & 1) + (e >= 2 ? 8 : 0);
            kd[e] = FULL ? k_dec[i0 / 16][e] : (i < m ? pow_s[m - 1 - i] : 0.f);
          }
          // The A operands first (K^T rows of this warp's state row tiles, decayed), then the V
          // fragments streamed one 16-column pair at a time: 4 live B registers, not 2·S_NT.
          uint32_t hi[S_MT][4], lo[S_MT][4];
#pragma unroll
          for (int mi = 0; mi < S_MT; ++mi) {
            const int d0 = (warp * S_MT + mi) * 16;
            // K^T rows d0.. as A, transposed from the token-major K tile: matrices
            // (i0, d0) (i0, d0+8) (i0+8, d0) (i0+8, d0+8) give a0 a1 a2 a3.
            uint32_t x[4];
            ldsm_x4_trans(x, k_at + so + (i0 * L::QK_LD + d0) * B2);
            // The decayed keys are fp32 values: a bf16 pair hi + lo keeps ~16 bits (the
            // fp32-state contract), as the Triton kernel does.
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const float2 kv = unpack_bf16x2(x[e]);
              const float d0 = kd[e >= 2 ? 2 : 0], d1 = kd[e >= 2 ? 3 : 1];
              hi[mi][e] = pack_bf16x2(kv.x * d0, kv.y * d1);
              const float2 yh = unpack_bf16x2(hi[mi][e]);
              lo[mi][e] = pack_bf16x2(fmaf(kv.x, d0, -yh.x), fmaf(kv.y, d1, -yh.y));  // exact residual
            }
          }
#pragma unroll
          for (int np = 0; np < S_NT / 2; ++np) {
            uint32_t x[4];
            ldsm_x4_trans(x, v_b + so + (i0 * L::V_LD + np * 16) * B2);
            const uint32_t b0[2] = {x[0], x[1]}, b1[2] = {x[2], x[3]};
#pragma unroll
            for (int mi = 0; mi < S_MT; ++mi) {
              if ((warp * S_MT + mi) * 16 < D) {  // row tiles wholly past D stay zero
                mma_bf16(st[mi][2 * np], lo[mi], b0);
                mma_bf16(st[mi][2 * np], hi[mi], b0);
                mma_bf16(st[mi][2 * np + 1], lo[mi], b1);
                mma_bf16(st[mi][2 * np + 1], hi[mi], b1);
              }
            }
          }
        }
      }
    }
    __syncthreads();     // all reads of this chunk's stage, of P and of S_in are done
    if (OUT) store_state_smem();  // S_in of the next chunk (visible after its first barrier)
  };
  for (; t0 + kChunk <= eos; t0 += kChunk, stage ^= 1) chunk_step(std::true_type{});
  if (t0 < eos) chunk_step(std::false_type{});

  if (w.out) {
#pragma unroll
    for (int mi = 0; mi < S_MT; ++mi)
#pragma unroll
      for (int ni = 0; ni < S_NT; ++ni)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int d = (warp * S_MT + mi) * 16 + g + (r >= 2 ? 8 : 0);
          const int c = ni * 8 + 2 * t + (r & 1);
          if (d < D && c < v_valid) w.out[static_cast<int64_t>(d) * DV + c] = st[mi][ni][r];
        }
  }
}

// ---- the segment split: table, scan ---------------------------------------------------------
//
// A sequence of len tokens is cut into max(1, ⌈len/L⌉) segments of L tokens (L = segment_len, a
// multiple of the chunk, so chunk boundaries are those of the unsplit walk), the last one
// partial; an empty sequence keeps one (empty) segment, which carries its initial state to its
// final state. Rows are numbered sequence by sequence, segments in order; Σ max(1, ⌈len/L⌉) ≤
// ⌈B·T/L⌉ + N = split_rows(), the static size of the table (unused rows: sequence -1), so the
// table is built on the device without a host synchronization. Same plan and table as the Triton
// prefill's build_segments (mm1_kernels/lightning/triton_prefill.py).

constexpr int kTableThreads = 256;
constexpr int kScanThreads = 256;

// One block: seg_first (an exclusive scan of the segment counts, in sequence order), then the
// table rows. Deterministic: fixed-order scan in shared memory, each row written by one thread.
__global__ void __launch_bounds__(kTableThreads)
lightning_prefill_segments_kernel(const PrefillArgs a, int64_t num_seqs, int64_t segment_len, int64_t rows) {
  __shared__ int64_t scan_s[kTableThreads];
  const int tid = threadIdx.x;
  int64_t carry = 0;  // segments of the sequences before this tile
  for (int64_t base = 0; base < num_seqs; base += kTableThreads) {
    const int64_t n = base + tid;
    int64_t cnt = 0;
    if (n < num_seqs) {
      int64_t row, bos, eos;
      seq_span(a, n, row, bos, eos);
      cnt = max((eos - bos + segment_len - 1) / segment_len, int64_t(1));
    }
    scan_s[tid] = cnt;
    __syncthreads();
    for (int off = 1; off < kTableThreads; off <<= 1) {  // inclusive Hillis-Steele scan
      const int64_t x = tid >= off ? scan_s[tid - off] : 0;
      __syncthreads();
      scan_s[tid] += x;
      __syncthreads();
    }
    if (n < num_seqs) a.seg_first[n] = carry + scan_s[tid] - cnt;
    carry += scan_s[kTableThreads - 1];
    __syncthreads();  // every thread has read scan_s before the next tile overwrites it
  }
  if (tid == 0) a.seg_first[num_seqs] = carry;
  __syncthreads();  // seg_first (global memory, written by this block) is visible to the block
  for (int64_t g = tid; g < rows; g += kTableThreads) {
    int64_t* r = a.seg_table + 4 * g;
    if (g >= carry) {  // an idle row (Σ segments < the static bound)
      r[0] = -1;
      r[1] = r[2] = r[3] = 0;
      continue;
    }
    int64_t lo = 0, hi = num_seqs - 1;  // the sequence: the last n with seg_first[n] <= g
    while (lo < hi) {                   // (strictly increasing: every sequence has a segment)
      const int64_t mid = (lo + hi + 1) / 2;
      if (a.seg_first[mid] <= g) lo = mid; else hi = mid - 1;
    }
    int64_t row, bos, eos;
    seq_span(a, lo, row, bos, eos);
    const int64_t t0 = bos + (g - a.seg_first[lo]) * segment_len;
    r[0] = lo;
    r[1] = t0;
    r[2] = min(t0 + segment_len, eos);
    r[3] = g == a.seg_first[lo + 1] - 1;
  }
}

// Local states -> incoming states, in place: per (sequence, head, 256 state elements), over the
// sequence's segments in order, S ← λ^L S + local (fp32, one fma), starting from the initial
// state (or zeros); the sequence's last segment gets the state after all the others. Every
// non-last segment holds exactly L tokens, so its decay over the segment is λ^L. Rows past the
// table (only reachable with overlapping varlen sequences, which the prefill does not support)
// are never touched.
__global__ void __launch_bounds__(kScanThreads)
lightning_prefill_scan_kernel(const PrefillArgs a, int64_t segment_len, int64_t rows) {
  const int64_t n = blockIdx.x;
  const int h = blockIdx.y;
  const int64_t head_state = static_cast<int64_t>(a.head_dim) * a.value_dim;
  const int64_t e = static_cast<int64_t>(blockIdx.z) * kScanThreads + threadIdx.x;
  if (e >= head_state) return;
  const int64_t first = a.seg_first[n], last = min(a.seg_first[n + 1], rows) - 1;
  // λ^L in double, rounded once (immune to --use_fast_math, like decay_pow).
  const float decay = static_cast<float>(exp(-static_cast<double>(a.slopes[h]) * static_cast<double>(segment_len)));
  float S = a.init ? a.init[(n * a.heads + h) * head_state + e] : 0.f;
  for (int64_t g = first; g < last; ++g) {
    float* p = a.seg_state + (g * a.heads + h) * head_state + e;
    const float local = *p;
    *p = S;
    S = fmaf(S, decay, local);
  }
  if (first <= last) a.seg_state[(last * a.heads + h) * head_state + e] = S;
}

// Above 48 KB of dynamic shared memory a kernel must opt in; cheap, and legal during capture.
// blocks: sequences (kWhole) or segment-table rows (kLocal, kOutput).
template <typename Kernel>
cudaError_t launch(Kernel kernel, size_t smem, int bv, const PrefillArgs& a, int64_t blocks, cudaStream_t stream) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(a.heads),
                  static_cast<unsigned>((a.value_dim + bv - 1) / bv));
  kernel<<<grid, kPrefillThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

template <int DMAX, int BV, int PASS, bool HIGH>
cudaError_t launch_bf16(const PrefillArgs& a, int64_t blocks, cudaStream_t stream) {
  constexpr size_t bytes = Bf16PrefillLayout<DMAX, BV, HIGH>::BYTES;
  return a.async16 ? launch(lightning_prefill_bf16_kernel<DMAX, BV, true, PASS, HIGH>, bytes, BV, a, blocks, stream)
                   : launch(lightning_prefill_bf16_kernel<DMAX, BV, false, PASS, HIGH>, bytes, BV, a, blocks, stream);
}

// high: precision "high" (bf16 only; fp32 and fp16 inputs ignore it, as in the Triton kernel).
template <typename T, int PASS>
cudaError_t dispatch_prefill(const PrefillArgs& a, int64_t blocks, bool high, cudaStream_t stream) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    if constexpr (PASS == kLocal) {  // state updates only: the same in both precisions
      return a.head_dim <= 128 ? launch_bf16<128, 128, PASS, false>(a, blocks, stream)
                               : launch_bf16<256, 32, PASS, false>(a, blocks, stream);
    } else {
      if (a.head_dim <= 128)
        return high ? launch_bf16<128, 128, PASS, true>(a, blocks, stream)
                    : launch_bf16<128, 128, PASS, false>(a, blocks, stream);
      return high ? launch_bf16<256, 32, PASS, true>(a, blocks, stream)
                  : launch_bf16<256, 32, PASS, false>(a, blocks, stream);
    }
  } else {
    if (a.head_dim <= 128)
      return launch(lightning_prefill_kernel<T, 128, 64, PASS>, PrefillLayout<128, 64>::BYTES, 64, a, blocks, stream);
    return launch(lightning_prefill_kernel<T, 256, 32, PASS>, PrefillLayout<256, 32>::BYTES, 32, a, blocks, stream);
  }
}

// Unsplit: one pass. Split: table, local pass, scan, output pass, in stream order.
template <typename T>
cudaError_t run_prefill(const PrefillArgs& a, int64_t num_seqs, int64_t segment_len, int64_t rows, bool high,
                        cudaStream_t stream) {
  if (segment_len == 0) return dispatch_prefill<T, kWhole>(a, num_seqs, high, stream);
  lightning_prefill_segments_kernel<<<1, kTableThreads, 0, stream>>>(a, num_seqs, segment_len, rows);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if ((err = dispatch_prefill<T, kLocal>(a, rows, high, stream)) != cudaSuccess) return err;
  const int64_t head_state = static_cast<int64_t>(a.head_dim) * a.value_dim;
  const dim3 grid(static_cast<unsigned>(num_seqs), static_cast<unsigned>(a.heads),
                  static_cast<unsigned>((head_state + kScanThreads - 1) / kScanThreads));
  lightning_prefill_scan_kernel<<<grid, kScanThreads, 0, stream>>>(a, segment_len, rows);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  return dispatch_prefill<T, kOutput>(a, rows, high, stream);
}

// Segment-table rows for the split: ⌈B·T/L⌉ + N bounds Σ max(1, ⌈len/L⌉) (module comment above).
int64_t split_rows(int64_t num_seqs, int64_t batch, int64_t seqlen, int64_t segment_len) {
  return (batch * seqlen + segment_len - 1) / segment_len + num_seqs;
}

// The workspace: seg_state, seg_table, seg_first, each at a 256-byte boundary.
struct SplitLayout {
  size_t table_off, first_off, bytes;
};
SplitLayout split_layout(int64_t rows, int64_t num_seqs, int64_t heads, int64_t head_dim, int64_t value_dim) {
  auto up = [](size_t x) { return (x + 255) / 256 * 256; };
  SplitLayout l;
  l.table_off = up(static_cast<size_t>(rows) * heads * head_dim * value_dim * sizeof(float));
  l.first_off = l.table_off + up(static_cast<size_t>(rows) * 4 * sizeof(int64_t));
  l.bytes = l.first_off + up(static_cast<size_t>(num_seqs + 1) * sizeof(int64_t));
  return l;
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace
}  // namespace lightning
}  // namespace mm1

extern "C" MM1_API cudaError_t mm1_lightning_prefill(
    mm1_dtype_t dtype, const void* q, const void* k, const void* v, void* o,
    const float* slopes, const float* initial_state, float* final_state,
    const void* cu_seqlens, int cu_index_bytes, int64_t num_seqs,
    int64_t batch, int64_t seqlen, int64_t heads, int64_t head_dim, int64_t value_dim,
    int64_t stride_qb, int64_t stride_qt, int64_t stride_qh,
    int64_t stride_kb, int64_t stride_kt, int64_t stride_kh,
    int64_t stride_vb, int64_t stride_vt, int64_t stride_vh,
    int64_t stride_ob, int64_t stride_ot, int64_t stride_oh,
    int64_t segment_len, int precision, void* workspace, size_t workspace_bytes,
    cudaStream_t stream) {
  using namespace mm1::lightning;
  if (segment_len < 0 || segment_len % kChunk != 0 || (precision != 0 && precision != 1)) return cudaErrorInvalidValue;
  if (heads < 1 || heads > 65535 || head_dim < 1 || value_dim < 1 || head_dim > MM1_LIGHTNING_MAX_HEAD_DIM ||
      value_dim > MM1_LIGHTNING_MAX_HEAD_DIM || batch < 0 || seqlen < 0 || num_seqs < 0 || num_seqs > 0x7fffffff)
    return cudaErrorInvalidValue;
  if (cu_seqlens != nullptr ? (batch != 1 || (cu_index_bytes != 4 && cu_index_bytes != 8)) : num_seqs != batch)
    return cudaErrorInvalidValue;
  if (num_seqs == 0) return cudaSuccess;
  if (!slopes || (seqlen > 0 && (!q || !k || !v || !o))) return cudaErrorInvalidValue;
  int64_t rows = 0;
  SplitLayout ws{};
  if (segment_len > 0) {
    rows = split_rows(num_seqs, batch, seqlen, segment_len);
    ws = split_layout(rows, num_seqs, heads, head_dim, value_dim);
    if (rows > 0x7fffffff || !workspace || !aligned(workspace, 16) || workspace_bytes < ws.bytes)
      return cudaErrorInvalidValue;
  }
  size_t elem = dtype == MM1_DTYPE_FLOAT32 ? 4 : 2;
  const bool vec4 = head_dim % 4 == 0 && value_dim % 4 == 0 && aligned(q, 4 * elem) && aligned(k, 4 * elem) &&
                    aligned(v, 4 * elem) && stride_qb % 4 == 0 && stride_qt % 4 == 0 && stride_qh % 4 == 0 &&
                    stride_kb % 4 == 0 && stride_kt % 4 == 0 && stride_kh % 4 == 0 && stride_vb % 4 == 0 &&
                    stride_vt % 4 == 0 && stride_vh % 4 == 0;
  // 16-byte rows for cp.async (bf16 kernel): 8 elements of 2 bytes.
  const bool async16 = elem == 2 && head_dim % 8 == 0 && value_dim % 8 == 0 && aligned(q, 16) && aligned(k, 16) &&
                       aligned(v, 16) && stride_qb % 8 == 0 && stride_qt % 8 == 0 && stride_qh % 8 == 0 &&
                       stride_kb % 8 == 0 && stride_kt % 8 == 0 && stride_kh % 8 == 0 && stride_vb % 8 == 0 &&
                       stride_vt % 8 == 0 && stride_vh % 8 == 0;
  PrefillArgs a{q, k, v, o, slopes, initial_state, final_state, cu_seqlens, cu_index_bytes, seqlen,
                static_cast<int>(heads), static_cast<int>(head_dim), static_cast<int>(value_dim), vec4, async16,
                stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh, nullptr, nullptr, nullptr};
  if (segment_len > 0) {
    char* base = static_cast<char*>(workspace);
    a.seg_state = reinterpret_cast<float*>(base);
    a.seg_table = reinterpret_cast<int64_t*>(base + ws.table_off);
    a.seg_first = reinterpret_cast<int64_t*>(base + ws.first_off);
  }
  const bool high = precision == 1;
  switch (dtype) {
    case MM1_DTYPE_FLOAT32: return run_prefill<float>(a, num_seqs, segment_len, rows, high, stream);
    case MM1_DTYPE_FLOAT16: return run_prefill<__half>(a, num_seqs, segment_len, rows, high, stream);
    case MM1_DTYPE_BFLOAT16: return run_prefill<__nv_bfloat16>(a, num_seqs, segment_len, rows, high, stream);
  }
  return cudaErrorInvalidValue;
}

extern "C" MM1_API size_t mm1_lightning_prefill_workspace_bytes(
    int64_t num_seqs, int64_t batch, int64_t seqlen, int64_t heads, int64_t head_dim, int64_t value_dim,
    int64_t segment_len) {
  using namespace mm1::lightning;
  if (segment_len <= 0 || num_seqs <= 0 || batch < 0 || seqlen < 0 || heads < 1 || head_dim < 1 || value_dim < 1)
    return 0;
  return split_layout(split_rows(num_seqs, batch, seqlen, segment_len), num_seqs, heads, head_dim, value_dim).bytes;
}
