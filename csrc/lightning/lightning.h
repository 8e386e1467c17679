/* Lightning attention (MiniMax-M1): the framework-free C API.
 *
 * Everything is raw device pointers, element strides, sizes and a cudaStream_t; no torch
 * headers, so any engine (or CuPy through ctypes / cuda-python) can call these. Shapes and
 * semantics match mm1_kernels.lightning_attention / lightning_decode:
 *
 *   per head h, decay λ = exp(-slopes[h]), fp32 state S [D, DV]:
 *     S_t = λ S_{t-1} + k_t^T v_t,   o_t = q_t S_t
 *
 * Conventions shared by every function:
 *  - q, k, v, o share one element type (mm1_dtype_t); their last dimension has unit stride,
 *    every other stride is given in ELEMENTS and may be anything (views of a fused qkv are fine).
 *  - states are fp32 and contiguous, [.., H, D, DV] row-major.
 *  - index arrays (slot ids, cu_seqlens) are int32 or int64 (index_bytes = 4 or 8).
 *  - nothing synchronizes the host and no memory is allocated, so calls can be captured in a
 *    CUDA graph. Errors are reported as the cudaError_t of the launch
 *    (cudaErrorInvalidValue for arguments the kernels do not support).
 */
#ifndef MM1_LIGHTNING_H_
#define MM1_LIGHTNING_H_

#include <stddef.h>
#include <stdint.h>
#include <cuda_runtime_api.h>

#if defined(_WIN32)
#define MM1_API __declspec(dllexport)
#else
/* Exported even from a library built with -fvisibility=hidden (mm1_kernels._C). */
#define MM1_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum mm1_dtype {
  MM1_DTYPE_FLOAT32 = 0,
  MM1_DTYPE_FLOAT16 = 1,
  MM1_DTYPE_BFLOAT16 = 2
} mm1_dtype_t;

/* Largest head dimension (q/k D and v DV) the kernels accept. */
#define MM1_LIGHTNING_MAX_HEAD_DIM 256

/* One decode step for a batch of B rows, updating state_cache in place.
 *
 * q, k: [B, H, D] (strides stride_qb/qh, stride_kb/kh); v: [B, H, DV]; o: [B, H, DV] written.
 * slopes: fp32 [H]. state_cache: fp32 [num_slots, H, D, DV] contiguous.
 * slot_ids: [B] int32/int64 or NULL (row b uses slot b). A negative slot is a padding row:
 * output 0, state untouched. A slot >= num_slots (possible only when the caller skipped its
 * range check) leaves the state untouched and writes NaN to that row's output.
 * Slots of different rows must be distinct (the rows would race otherwise).
 */
MM1_API cudaError_t mm1_lightning_decode(
    mm1_dtype_t dtype, const void* q, const void* k, const void* v, void* o,
    const float* slopes, float* state_cache, const void* slot_ids, int slot_index_bytes,
    int64_t batch, int64_t heads, int64_t head_dim, int64_t value_dim, int64_t num_slots,
    int64_t stride_qb, int64_t stride_qh, int64_t stride_kb, int64_t stride_kh,
    int64_t stride_vb, int64_t stride_vh, int64_t stride_ob, int64_t stride_oh,
    cudaStream_t stream);

/* Chunked prefill. q, k: [B, T, H, D]; v, o: [B, T, H, DV] (strides *_b, *_t, *_h; o written).
 * slopes: fp32 [H].
 * cu_seqlens: NULL (N = B sequences of T tokens) or [N+1] int32/int64 offsets into T with B == 1
 *   (offsets are clamped to [0, T]; a decreasing pair is an empty sequence).
 * initial_state: NULL (zeros) or fp32 [N, H, D, DV] contiguous.
 * final_state: NULL or fp32 [N, H, D, DV] contiguous, written with each sequence's last state.
 * Tokens of o outside every sequence (varlen offsets not covering [0, T)) are not written.
 * Varlen sequences must not overlap (their tokens would be written twice).
 *
 * segment_len: 0 = one CTA per (sequence, head, value tile) walks the whole sequence. A positive
 *   multiple of 64 splits every sequence into segments of segment_len tokens (the last one
 *   partial; an empty sequence keeps one empty segment) so that few long sequences still fill
 *   the GPU: a local-state pass over every non-last segment, a scan over segment boundaries
 *   (fp32, S <- λ^L S + local, in segment order, from initial_state) and an output pass from
 *   each segment's incoming state (the sequence's last segment writes final_state). The split
 *   changes only fp32 rounding (o within the dtype's rounding, states ~1e-6). The segment table
 *   is built on the device (no host synchronization); deterministic, no atomics. Choose it with
 *   the Python planner (mm1_kernels/lightning/triton_prefill.py, choose_segment_len), or any
 *   multiple of 64: more segments fill more SMs but recompute each non-last segment's K^T V.
 * precision: bf16 inputs only (fp32 and fp16 ignore it), as lightning_attention's precision=:
 *   0 "default": the state in q S and the decayed scores in P V are rounded to bf16 once
 *   (within 2x the naive bf16 error); 1 "high": each is a bf16 pair hi + lo (~16 significant
 *   bits, two tensor-core products each). The state update's decayed keys are a pair in both.
 * workspace: caller-owned device memory of at least
 *   mm1_lightning_prefill_workspace_bytes(...) bytes, 16-byte aligned (unused, may be NULL, when
 *   segment_len == 0); its contents on entry do not matter. cudaErrorInvalidValue when too small.
 */
MM1_API cudaError_t mm1_lightning_prefill(
    mm1_dtype_t dtype, const void* q, const void* k, const void* v, void* o,
    const float* slopes, const float* initial_state, float* final_state,
    const void* cu_seqlens, int cu_index_bytes, int64_t num_seqs,
    int64_t batch, int64_t seqlen, int64_t heads, int64_t head_dim, int64_t value_dim,
    int64_t stride_qb, int64_t stride_qt, int64_t stride_qh,
    int64_t stride_kb, int64_t stride_kt, int64_t stride_kh,
    int64_t stride_vb, int64_t stride_vt, int64_t stride_vh,
    int64_t stride_ob, int64_t stride_ot, int64_t stride_oh,
    int64_t segment_len, int precision, void* workspace, size_t workspace_bytes,
    cudaStream_t stream);

/* Workspace bytes mm1_lightning_prefill needs for these sizes (the arguments of the same
 * names): one fp32 [H, D, DV] state and 32 bytes of segment table per row, ⌈batch·seqlen /
 * segment_len⌉ + num_seqs rows (a static bound of the segments), and 8·(num_seqs + 1) bytes. A
 * pure function of the sizes, so it can be allocated before the cu_seqlens values are known
 * (and during CUDA graph capture). 0 when segment_len <= 0 (no split) or num_seqs <= 0. */
MM1_API size_t mm1_lightning_prefill_workspace_bytes(
    int64_t num_seqs, int64_t batch, int64_t seqlen, int64_t heads, int64_t head_dim, int64_t value_dim,
    int64_t segment_len);

#ifdef __cplusplus
}  /* extern "C" */
#endif

#endif  /* MM1_LIGHTNING_H_ */
