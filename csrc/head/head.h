/* FP32 LM head (MiniMax-M1, docs/m1_math.md §6): the framework-free C API.
 *
 * Raw device pointers, element strides, sizes and a cudaStream_t; no torch headers. Semantics
 * match mm1_kernels.head_logprobs (forward statistics) and the logit gradient its backward
 * needs. Per token t, with tempered fp32 logits z = (hidden @ weight^T) · (1/temperature):
 *
 *   lse = log Σ_j exp z_j,   logprob = z[target] - lse (0 when target == -100),
 *   entropy = lse - Σ_j p_j z_j,  p = softmax(z)
 *
 * computed without a [T, V] tensor: per (token tile, vocabulary split of 2048 ids) the kernels
 * keep running (max, Σexp, Σexp·(z-max), target logit) and a second kernel merges the splits
 * of each token in split order. The number of splits depends on V only, every tile shape is
 * fixed and nothing is accumulated with atomics, so results are bitwise reproducible and a
 * token's results do not depend on T or on the other rows (batch invariance).
 *
 * Conventions shared by every function:
 *  - hidden [T, K] and weight [V, K] share one element type (mm1_dtype_t) and have unit stride
 *    in K; the row strides are given in ELEMENTS.
 *  - targets are int32 or int64 (target_index_bytes = 4 or 8), contiguous; -100 marks an
 *    ignored row; any other id outside [0, V) matches no column (its logprob is then wrong,
 *    never an out-of-bounds read: the caller range-checks).
 *  - per-token arrays (logprobs, lse, entropy, upstream gradients) are contiguous fp32 [T].
 *  - temperature must be finite and > 0; the kernels multiply by (float)(1 / temperature).
 *  - every pointer is aligned to its element size (else cudaErrorInvalidValue).
 *  - nothing synchronizes the host and nothing is allocated (the forward's workspace is the
 *    caller's), so calls can be captured in a CUDA graph. Errors are the cudaError_t of the
 *    launch (cudaErrorInvalidValue for arguments the kernels do not support).
 */
#ifndef MM1_HEAD_H_
#define MM1_HEAD_H_

#include <stddef.h>
#include <stdint.h>
#include <cuda_runtime_api.h>

/* mm1_dtype_t and MM1_API are shared by every op's C API; they live in lightning.h. */
#include "lightning/lightning.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Vocabulary ids per split of the forward (a multiple of the 128-wide vocabulary tile). */
#define MM1_HEAD_SPLIT_V 2048

/* Splits of the forward for a vocabulary of V ids: ceil(V / MM1_HEAD_SPLIT_V). */
MM1_API int64_t mm1_head_num_splits(int64_t vocab);

/* Bytes of the forward's workspace: num_splits(V) · 4 · T fp32 (16 bytes per token per split). */
MM1_API size_t mm1_head_workspace_bytes(int64_t tokens, int64_t vocab);

/* Forward statistics. hidden: [T, K] (row stride stride_h); weight: [V, K] (row stride
 * stride_w); targets: [T]. workspace: fp32, mm1_head_workspace_bytes(T, V) bytes, 16-byte
 * aligned. logprobs, lse, entropy: fp32 [T], written.
 * logits: NULL, or fp32 [T, V] (row stride stride_logits) that receives the tempered logits
 * the statistics were computed from, bitwise (sampling from exactly that distribution).
 * T = 0 launches nothing. V >= 1 and K >= 1 are required. */
MM1_API cudaError_t mm1_head_forward(
    mm1_dtype_t dtype, const void* hidden, const void* weight, const void* targets,
    int target_index_bytes, float* workspace, float* logprobs, float* lse, float* entropy,
    float* logits, int64_t tokens, int64_t vocab, int64_t hidden_dim,
    int64_t stride_h, int64_t stride_w, int64_t stride_logits, double temperature,
    cudaStream_t stream);

/* Gradient w.r.t. the untempered logits of one block of rows × cols, fp32, recomputing the
 * logits with the forward's tiles (bitwise the same logits):
 *
 *   dz[r, c] = (g_lp[r] (onehot - p) + g_lse[r] p - g_ent[r] p (log p + entropy[r])) / temperature
 *
 * with p = exp(z - lse[r]) and onehot = (vocab_offset + c == targets[r]). hidden: [rows, K]
 * (the block's first row), weight: [cols, K] (the block's first vocabulary row, id
 * vocab_offset), targets, g_lp, g_lse, g_ent, lse, entropy: [rows]; dz: fp32 [rows, cols] with
 * row stride stride_dz. g_lp of an ignored row (-100) is treated as 0. */
MM1_API cudaError_t mm1_head_dlogits(
    mm1_dtype_t dtype, const void* hidden, const void* weight, const void* targets,
    int target_index_bytes, const float* g_lp, const float* g_lse, const float* g_ent,
    const float* lse, const float* entropy, float* dz, int64_t rows, int64_t cols,
    int64_t vocab_offset, int64_t hidden_dim, int64_t stride_h, int64_t stride_w,
    int64_t stride_dz, double temperature, cudaStream_t stream);

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif  /* MM1_HEAD_H_ */
