// MoE permutation metadata (the alignment) and the combine.
//
// Alignment: the N = T·k (token, slot) entries are grouped by local expert, each expert's
// group padded to a multiple of the GEMM row tile kBlockM; sorted_ids[slot] is the entry index
// t·k + j, or the sentinel N in padding slots, and block_expert[tile] is the tile's expert, or
// -1 past the padded total. Within an expert the entries ascend (token order, then slot): the
// result is a pure function of the ids, with no atomics anywhere. Three launches, all sized
// from shapes (CUDA-graph capturable):
//
//   1. moe_count_kernel     one block per chunk of 256 entries: the chunk's count per expert
//                           (thread e counts the matches of expert e in the chunk, in shared
//                           memory) -> chunk_counts[chunk][e].
//   2. moe_offsets_kernel   one block, a thread per expert: exclusive prefix over chunks
//                           (chunk_offsets[c][e], in chunk order) and the expert totals, then a
//                           block scan of the padded totals over experts -> padded_start/end.
//                           O(chunks) per thread; E <= 1024.
//   3. moe_scatter_kernel   blocks [0, chunks): entry i goes to padded_start[e] +
//                           chunk_offsets[c][e] + (matches of e before i in its chunk);
//                           the remaining blocks write the sentinels of padding slots and the
//                           expert of every tile (binary search of padded_end). The two sets
//                           of slots are disjoint, so no ordering between them is needed.
//
// Expert parallelism: ids are mapped through expert_map first (local_expert): entries of
// other ranks' experts (-1) and invalid ones (-2) are never placed, so they cost no GEMM rows.
//
// Combine: y[t] = Σ_j rows[t·k + j] in slot order j = 0..k-1 (fp32), then the cast; a slot
// whose expert is on another rank adds exactly zero, an invalid one NaN (its row was never
// written). Fixed order, no atomics: bitwise deterministic, as the Triton combine.
#include <algorithm>

#include "moe/moe_common.cuh"
#include "moe/moe_launch.h"

namespace mm1 {
namespace moe {
namespace {

constexpr int kAlignThreads = kAlignChunk;
constexpr int kOffsetsThreads = MM1_MOE_MAX_EXPERTS;
constexpr int kCombineThreads = 256;

struct AlignArgs {
  ExpertMap map;
  int64_t entries;
  int64_t num_chunks;
  int64_t max_blocks;
  int32_t* chunk_counts;
  int32_t* chunk_offsets;
  int32_t* counts;
  int32_t* padded_start;
  int32_t* padded_end;
  int32_t* sorted_ids;
  int32_t* block_expert;
};

__global__ void __launch_bounds__(kAlignThreads)
moe_count_kernel(const AlignArgs a) {
  __shared__ int s_expert[kAlignChunk];
  const int tid = threadIdx.x;
  const int64_t c = blockIdx.x;
  const int64_t i = c * kAlignChunk + tid;
  s_expert[tid] = i < a.entries ? local_expert(a.map, i) : -3;
  __syncthreads();
  const int E = a.map.num_experts;
  for (int e = tid; e < E; e += kAlignThreads) {
    int n = 0;
    for (int j = 0; j < kAlignChunk; ++j) n += s_expert[j] == e;  // a broadcast read per step
    a.chunk_counts[c * E + e] = n;
  }
}

__global__ void __launch_bounds__(kOffsetsThreads)
moe_offsets_kernel(const AlignArgs a) {
  __shared__ int s_scan[kOffsetsThreads];
  const int e = threadIdx.x;
  const int E = a.map.num_experts;
  int count = 0;
  if (e < E) {
    for (int64_t c = 0; c < a.num_chunks; ++c) {  // chunk order: ranks follow entry order
      a.chunk_offsets[c * E + e] = count;
      count += a.chunk_counts[c * E + e];
    }
  }
  const int padded = (count + kBlockM - 1) / kBlockM * kBlockM;
  s_scan[e] = padded;
  __syncthreads();
  for (int off = 1; off < kOffsetsThreads; off *= 2) {  // inclusive scan over experts
    const int v = e >= off ? s_scan[e - off] : 0;
    __syncthreads();
    s_scan[e] += v;
    __syncthreads();
  }
  if (e < E) {
    a.counts[e] = count;
    a.padded_end[e] = s_scan[e];
    a.padded_start[e] = s_scan[e] - padded;
  }
}

__global__ void __launch_bounds__(kAlignThreads)
moe_scatter_kernel(const AlignArgs a) {
  __shared__ int s_expert[kAlignChunk];
  const int tid = threadIdx.x;
  const int E = a.map.num_experts;
  if (blockIdx.x < a.num_chunks) {
    const int64_t c = blockIdx.x;
    const int64_t i = c * kAlignChunk + tid;
    const int e = i < a.entries ? local_expert(a.map, i) : -3;
    s_expert[tid] = e;
    __syncthreads();
    if (e >= 0) {
      int rank = 0;
      for (int j = 0; j < tid; ++j) rank += s_expert[j] == e;
      a.sorted_ids[a.padded_start[e] + a.chunk_offsets[c * E + e] + rank] = static_cast<int32_t>(i);
    }
    return;
  }
  // Padding slots and tile experts.
  const int64_t slots = a.max_blocks * kBlockM;
  const int64_t total = a.padded_end[E - 1];
  const int64_t stride = static_cast<int64_t>(gridDim.x - a.num_chunks) * kAlignThreads;
  for (int64_t s = (blockIdx.x - a.num_chunks) * kAlignThreads + tid; s < slots; s += stride) {
    int e = -1;
    bool real = false;
    if (s < total) {
      int lo = 0, hi = E;  // the first expert whose padded range ends after s
      while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (a.padded_end[mid] <= s) lo = mid + 1; else hi = mid;
      }
      e = lo;
      real = s < static_cast<int64_t>(a.padded_start[e]) + a.counts[e];
    }
    if (!real) a.sorted_ids[s] = static_cast<int32_t>(a.entries);
    if (s % kBlockM == 0) a.block_expert[s / kBlockM] = e;
  }
}

template <typename T>
__global__ void __launch_bounds__(kCombineThreads)
moe_combine_kernel(const float* rows, const ExpertMap map, int top_k, T* out, int64_t stride_ot, int64_t hidden) {
  const int64_t t = blockIdx.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.y) * kCombineThreads + threadIdx.x; c < hidden;
       c += static_cast<int64_t>(gridDim.y) * kCombineThreads) {
    float acc = 0.f;
    for (int j = 0; j < top_k; ++j) {
      const int64_t entry = t * top_k + j;
      const int e = local_expert(map, entry);
      // Only placed entries have a row: another rank's expert adds exactly zero, an invalid id NaN.
      acc += e >= 0 ? rows[entry * hidden + c] : (e == -1 ? 0.f : __int_as_float(0x7fc00000));
    }
    out[t * stride_ot + c] = from_float<T>(acc);
  }
}

}  // namespace
}  // namespace moe
}  // namespace mm1

// ==== host code below: not emulated (tests/cuda_emulation/gen_moe.py cuts here) ====

namespace mm1 {
namespace moe {

namespace {
AlignArgs align_args(const AlignBuffers& b) {
  return AlignArgs{ExpertMap{b.ids, b.ids_bytes, b.map, b.map_bytes, b.map_len, b.num_experts},
                   b.entries, (b.entries + kAlignChunk - 1) / kAlignChunk, b.max_blocks,
                   b.chunk_counts, b.chunk_offsets, b.counts, b.padded_start, b.padded_end,
                   b.sorted_ids, b.block_expert};
}
}  // namespace

cudaError_t launch_align(const AlignBuffers& b, cudaStream_t stream) {
  const AlignArgs a = align_args(b);
  if (a.num_chunks > 0x7fff0000 || b.num_experts > MM1_MOE_MAX_EXPERTS) return cudaErrorInvalidValue;
  moe_count_kernel<<<static_cast<unsigned>(a.num_chunks), kAlignThreads, 0, stream>>>(a);
  moe_offsets_kernel<<<1, kOffsetsThreads, 0, stream>>>(a);
  // Enough fill blocks to cover the slots in a few passes, not one block per 256 slots.
  const int64_t fill = std::min<int64_t>((a.max_blocks * kBlockM + kAlignThreads - 1) / kAlignThreads, 1024);
  moe_scatter_kernel<<<static_cast<unsigned>(a.num_chunks + fill), kAlignThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t launch_combine(mm1_dtype_t dtype, const float* rows, const AlignBuffers& b, int top_k,
                           void* out, int64_t stride_ot, int64_t num_tokens, int64_t hidden,
                           cudaStream_t stream) {
  const ExpertMap map{b.ids, b.ids_bytes, b.map, b.map_bytes, b.map_len, b.num_experts};
  const dim3 grid(static_cast<unsigned>(num_tokens),
                  static_cast<unsigned>(std::min<int64_t>((hidden + kCombineThreads - 1) / kCombineThreads, 65535)));
  switch (dtype) {
    case MM1_DTYPE_FLOAT16:
      moe_combine_kernel<__half><<<grid, kCombineThreads, 0, stream>>>(rows, map, top_k, static_cast<__half*>(out),
                                                                        stride_ot, hidden);
      break;
    case MM1_DTYPE_BFLOAT16:
      moe_combine_kernel<__nv_bfloat16><<<grid, kCombineThreads, 0, stream>>>(
          rows, map, top_k, static_cast<__nv_bfloat16*>(out), stride_ot, hidden);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace moe
}  // namespace mm1
