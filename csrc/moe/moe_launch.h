// Internal (C++) launchers shared by the MoE translation units; the public API is moe.h.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "moe/moe.h"

namespace mm1 {
namespace moe {

// Rows of one GEMM tile: every expert's entries are padded to a multiple of it.
constexpr int kBlockM = 64;
// Entries per block of the counting / scatter kernels.
constexpr int kAlignChunk = 256;

// The static bound on row tiles: every non-empty expert wastes at most kBlockM - 1 rows.
inline int64_t max_row_tiles(int64_t entries, int64_t experts) {
  const int64_t nonempty = experts < entries ? experts : entries;
  return (entries + nonempty * (kBlockM - 1) + kBlockM - 1) / kBlockM;
}

struct AlignBuffers {
  const void* ids;
  int ids_bytes;
  const void* map;
  int map_bytes;
  int64_t map_len;
  int num_experts;
  int64_t entries;      // N = T·k
  int64_t max_blocks;   // max_row_tiles(N, E)
  int32_t* chunk_counts;   // [chunks, E]
  int32_t* chunk_offsets;  // [chunks, E]
  int32_t* counts;         // [E]
  int32_t* padded_start;   // [E]
  int32_t* padded_end;     // [E]
  int32_t* sorted_ids;     // [max_blocks · kBlockM]
  int32_t* block_expert;   // [max_blocks]
};

// Three launches: per-chunk counts, per-expert offsets, scatter + padding fill.
cudaError_t launch_align(const AlignBuffers& b, cudaStream_t stream);

// y[t] = Σ_j rows[t·k + j] (slot order), cast to dtype; rows fp32 [N, hidden].
cudaError_t launch_combine(mm1_dtype_t dtype, const float* rows, const AlignBuffers& b, int top_k,
                           void* out, int64_t stride_ot, int64_t num_tokens, int64_t hidden,
                           cudaStream_t stream);

}  // namespace moe
}  // namespace mm1
