"""The Triton backend of ``invariant_linear``: one tile shape for every row count.

Program (row tile, column tile) accumulates ``x[rows] @ w[cols]^T`` over K in ``BLOCK_K``
steps, always in increasing K, in fp32 (fp32 inputs: ``input_precision="ieee"``, no TF32),
then rounds once to x's dtype. No split-K and no tile choice that follows M, so a row's bits
do not depend on how many rows there are or which tile it shares (a tensor core's result for
a row depends on that row only; the interpreter's dot is made so by ``_triton_interpret``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton_interpret import interpreted_with_fixes

# Fixed for every M: changing any of them changes the arithmetic (the K steps) or nothing
# about a row's result (M, N). 64 x 64 x 64 bf16 tiles fill one Hopper warpgroup.
BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 64


@interpreted_with_fixes
@triton.jit
def invariant_linear_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                            PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def invariant_linear_triton(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    M, K = x.shape
    N = weight.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 is moot for 16-bit inputs
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    invariant_linear_kernel[grid](x, weight, out, M, N, K, x.stride(0), weight.stride(0), out.stride(0),
                                  PRECISION=precision, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                                  num_warps=4, num_stages=3)
    return out
