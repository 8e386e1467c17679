/* Fused MoE (MiniMax-M1): the framework-free C API.
 *
 * Raw device pointers, element strides, sizes and a cudaStream_t; no torch headers. Semantics
 * match mm1_kernels.moe_route / fused_moe (mm1_kernels/moe/reference.py is the truth):
 *
 *   route:  p = softmax(logits) in fp32; top-k of p, ties to the lower expert index;
 *           optionally w /= sum(w). A row with a NaN or +inf logit, or all logits -inf, gets
 *           ids 0..k-1 and NaN weights.
 *   experts: y[t] = sum_j w[t,j] * W2[e] (silu(W1[e] x[t]) * W3[e] x[t]),  e = ids[t,j],
 *           the k terms summed in slot order j = 0..k-1 (deterministic, no atomics).
 *
 * Conventions:
 *  - mm1_dtype_t (lightning/lightning.h) names the activation dtype; fused_moe takes bf16 or
 *    fp16 activations (tensor-core operands) and expert weights in the same dtype, or int8
 *    weight-only with fp32 per-output-channel scales (w ~= w_q * scale[..., None]).
 *  - the last dimension of every matrix has unit stride; other strides are in ELEMENTS. The
 *    kernels copy 16-byte vectors with cp.async, so x, w13, w2 need 16-byte aligned base
 *    pointers and rows (strides that are multiples of 16 bytes); every other pointer must be
 *    aligned to its element size; anything else is cudaErrorInvalidValue. With one token, the
 *    row strides of x and out are ignored.
 *  - ids are int32 or int64 (ids_bytes 4 or 8), contiguous [T, k]; expert_map (optional) is
 *    int32/int64 [G]: global id -> local expert, -1 = on another rank (vLLM's convention);
 *    such a slot adds exactly zero. An id or map value out of range gives that token a NaN
 *    output row (never an out-of-bounds access).
 *  - nothing synchronizes the host, nothing is allocated: the caller passes a device workspace
 *    of mm1_fused_moe_workspace_size() bytes, so calls can be captured in a CUDA graph.
 *    Errors are the cudaError_t of the launches (cudaErrorInvalidValue for bad arguments).
 */
#ifndef MM1_MOE_H_
#define MM1_MOE_H_

#include <stddef.h>
#include <stdint.h>
#include <cuda_runtime_api.h>

#include "lightning/lightning.h" /* mm1_dtype_t, MM1_API */

#ifdef __cplusplus
extern "C" {
#endif

/* Largest expert count of the routing and alignment kernels (a routing row lives in one warp's
 * registers; the alignment scans experts in one block). */
#define MM1_MOE_MAX_EXPERTS 1024

/* Router. logits: [T, E] of dtype (fp32, fp16 or bf16), row stride stride_t (elements), unit
 * column stride. topk_weights: fp32 [T, k] and topk_ids: int32 [T, k], contiguous, written.
 * 1 <= top_k <= E <= MM1_MOE_MAX_EXPERTS. */
MM1_API cudaError_t mm1_moe_route(mm1_dtype_t dtype, const void* logits, int64_t num_tokens,
                                  int64_t num_experts, int64_t stride_t, int top_k, int renormalize,
                                  float* topk_weights, int32_t* topk_ids, cudaStream_t stream);

/* Bytes of device workspace mm1_fused_moe needs (0 for an empty problem). Depends on shapes
 * only. The workspace must be 256-byte aligned (any cudaMalloc / torch allocation is). */
MM1_API size_t mm1_fused_moe_workspace_size(mm1_dtype_t dtype, int64_t num_tokens, int64_t top_k,
                                            int64_t num_experts, int64_t hidden, int64_t inter);

/* The experts and the weighted top-k sum.
 * x: [T, hidden] (row stride stride_xt). w13: [E, 2I, hidden] (gate rows [0, I), up rows
 * [I, 2I); strides stride_w13_e, stride_w13_n); w2: [E, hidden, I] (stride_w2_e, stride_w2_n).
 * weights_int8 != 0: w13/w2 are int8 and w13_scale fp32 [E, 2I], w2_scale fp32 [E, hidden]
 * (any strides) are required; else they are ignored and the weights have x's dtype.
 * topk_weights: fp32 [T, k] contiguous. topk_ids: [T, k] contiguous (ids_bytes 4 or 8).
 * expert_map: NULL or [map_len] (map_bytes 4 or 8). out: [T, hidden] in x's dtype (row stride
 * stride_ot >= hidden: rows must not overlap), written. */
MM1_API cudaError_t mm1_fused_moe(
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
    void* workspace, size_t workspace_bytes, cudaStream_t stream);

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif  /* MM1_MOE_H_ */
