"""The head's backward driver, shared by the torch and Triton backends.

Both backends recompute the logits of one (rows × vocabulary chunk) block at a time and hand
the driver a function that returns that block's fp32 gradient w.r.t. the logits; the driver
owns the block order (which makes the result deterministic), the fp32 accumulation and the
two gradient GEMMs. Nothing here is reference math: the truth is ``reference.head_reference``.
"""
from __future__ import annotations

import torch

# Elements of one fp32 logits block (256 MiB): the torch backend's forward blocks of rows, and
# both backends' backward blocks of rows × BACKWARD_VOCAB_CHUNK.
TORCH_BLOCK_ELEMENTS = 1 << 26
# Vocabulary columns per backward block (both backends); the backward's scratch is
# rows × BACKWARD_VOCAB_CHUNK fp32, independent of V.
BACKWARD_VOCAB_CHUNK = 4096


def _tensor_core_gradients(hidden: torch.Tensor) -> bool:
    """16-bit inputs on a GPU whose torch has ``mm`` with an fp32 ``out_dtype`` (torch >= 2.8)."""
    return (hidden.device.type == "cuda" and hidden.dtype in (torch.bfloat16, torch.float16)
            and "dtype" in torch.ops.aten.mm.overloads())


def gemm_operand_dtype(hidden: torch.Tensor) -> torch.dtype:
    """dtype of the gradient GEMMs' operands (dz, the weight chunk, hidden): the input dtype on
    tensor cores, fp32 otherwise. A backend may return dz in it already (the Triton kernel
    stores it so); the driver's conversion is then a no-op."""
    return hidden.dtype if _tensor_core_gradients(hidden) else torch.float32


def head_backward_blocks(hidden, weight, dz_block, rows_per_block: int,
                         vocab_chunk: int = BACKWARD_VOCAB_CHUNK, need_dweight: bool = True):
    """Shared backward driver: (dhidden, dweight) in the inputs' dtypes.

    ``dz_block(t0, t1, v0, v1)`` returns the gradient w.r.t. the logits of that block, fp32
    or already in :func:`gemm_operand_dtype`.
    Blocks are visited in a fixed order (vocabulary chunks outer, rows inner) and both
    gradients accumulate in fp32, so the result is deterministic; scratch is one block, the
    fp32 ``[T, K]`` hidden gradient and one fp32 ``[vocab_chunk, K]`` slice of the weight and of
    its gradient, never ``[T, V]``.

    GEMM precision: fp32 inputs, and any input on the CPU, take the fp32 block as it is (IEEE
    fp32 unless the caller enabled TF32 for torch matmuls). 16-bit inputs on a GPU round the
    block to the input dtype and accumulate in fp32 on tensor cores (``torch.mm(...,
    out_dtype=float32)``): on an H100 that is ~15x the fp32 CUDA-core rate (the backward's two
    GEMMs are 4·T·V·K FLOPs, ~40 TFLOP at 8k tokens × M1's head) for one extra rounding of dz
    (2^-9 relative), the size of the final rounding of the returned bf16 gradients.
    """
    T, K = hidden.shape
    V = weight.shape[0]
    dh = torch.zeros(T, K, dtype=torch.float32, device=hidden.device)
    # Each vocabulary chunk's weight gradient is complete after its row loop, so it is cast
    # to the weight's dtype right away: no fp32 copy of the whole [V, K] gradient.
    dw = torch.empty(V if need_dweight else 0, K, dtype=weight.dtype, device=hidden.device)
    tensor_cores = _tensor_core_gradients(hidden)
    gemm_dtype = gemm_operand_dtype(hidden)

    def gemm(a, b):
        return torch.mm(a, b, out_dtype=torch.float32) if tensor_cores else a @ b

    h_cache = (hidden.to(gemm_dtype) if need_dweight and T * K * 4 <= (1 << 30) else None)
    for v0 in range(0, V, vocab_chunk):
        v1 = min(V, v0 + vocab_chunk)
        w_chunk = weight[v0:v1].to(gemm_dtype)
        dwc = torch.zeros(v1 - v0, K, dtype=torch.float32, device=hidden.device) if need_dweight else None
        for t0 in range(0, T, rows_per_block):
            t1 = min(T, t0 + rows_per_block)
            dz = dz_block(t0, t1, v0, v1).to(gemm_dtype)
            dh[t0:t1] += gemm(dz, w_chunk)
            if need_dweight:
                h = h_cache[t0:t1] if h_cache is not None else hidden[t0:t1].to(gemm_dtype)
                dwc += gemm(dz.T, h)
        if need_dweight:
            dw[v0:v1] = dwc
    return dh.to(hidden.dtype), (dw if need_dweight else dw.reshape(0))
