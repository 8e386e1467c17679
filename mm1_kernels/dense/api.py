"""``invariant_linear``: ``x @ weight^T`` whose every output row depends on that input row only.

A GEMM library picks its kernel, tiles and reduction split from the row count: on a CPU a one-row
product takes a GEMV path (different bits from the same row inside a 64-row product), on a GPU
cuBLAS changes tiles and split-K with M. Consistent mode (``mm1_model``'s ``consistent=True``)
routes every projection and the router through this op instead, so a token's projections are
the same bits in prefill, decode and training, whatever else is in the batch:

- ``torch``: rows are processed in blocks of ``ROW_BLOCK`` (the last one zero-padded), one
  fixed-shape fp32 GEMM per block (bf16/fp16 inputs upcast: every product exact, fp32
  accumulation, one rounding to the output dtype). Measured: a row's result does not depend on
  its position inside a block or on the other rows (tests/test_dense.py).
- ``triton``: one tile shape for every M (``BLOCK_M/N/K`` below), fp32 accumulation in a
  fixed K order, no split-K; a row's tile arithmetic is the same whatever the other rows hold.

Registered as ``torch.ops.mm1.invariant_linear`` with a fake and an autograd formula (the
backward is plain fp32 torch: gradients need not be batch invariant, only the forward is).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import FLOAT_DTYPES, check_tensor
from .._dispatch import register_op, resolve_backend
from .._nvtx import annotate

register_op("invariant_linear", backends=("torch", "triton"))

# torch backend: the rows of one fixed-shape GEMM (>= every CPU BLAS micro-tile height, so no
# row falls in an edge tile of a different kernel).
ROW_BLOCK = 64


def invariant_linear_torch(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` (x ``[M, K]``, weight ``[N, K]``) in fp32 through fixed 64-row zero-padded
    blocks: the torch backend of :func:`invariant_linear`, also the consistent-mode MoE's GEMM
    (no checks, no dispatch: callers have validated their operands)."""
    M = x.shape[0]
    wt = weight.float().t()
    out = torch.empty(M, weight.shape[0], dtype=torch.float32, device=x.device)
    block = x.new_zeros(ROW_BLOCK, x.shape[1], dtype=torch.float32)
    for m0 in range(0, M, ROW_BLOCK):
        rows = min(ROW_BLOCK, M - m0)
        if rows < ROW_BLOCK:
            block.zero_()
        block[:rows] = x[m0:m0 + rows]
        out[m0:m0 + rows] = (block @ wt)[:rows]
    return out.to(x.dtype)


@torch.library.custom_op("mm1::invariant_linear", mutates_args=())
def _invariant_linear_op(x: torch.Tensor, weight: torch.Tensor, backend: str) -> torch.Tensor:
    if x.shape[0] == 0:
        return x.new_zeros(0, weight.shape[0])
    if backend == "triton":
        from .triton_linear import invariant_linear_triton
        return invariant_linear_triton(x, weight)
    return invariant_linear_torch(x, weight)


@_invariant_linear_op.register_fake
def _(x, weight, backend):
    return x.new_empty(x.shape[0], weight.shape[0])


def _setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight)


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    g = grad.float()
    dx = (g @ weight.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
    dw = (g.t() @ x.float()).to(weight.dtype) if ctx.needs_input_grad[1] else None
    return dx, dw, None


torch.library.register_autograd("mm1::invariant_linear", _backward, setup_context=_setup_context)


@annotate("mm1.invariant_linear")
def invariant_linear(x: torch.Tensor, weight: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """``x @ weight^T``, batch invariant: each output row is a function of its input row alone.

    Args:
        x: ``[..., K]`` bf16, fp16 or fp32 (any leading shape; rows are ``x.reshape(-1, K)``).
        weight: ``[N, K]``, x's dtype, on x's device.
        backend: ``"torch"``, ``"triton"`` or None (automatic; see ``_dispatch``).

    Returns ``[..., N]`` in x's dtype: fp32 accumulation, one rounding. Deterministic, and the
    same bits for a row whether it is computed alone or among any other rows, at any position
    (for one backend, device and build). Differentiable w.r.t. ``x`` and ``weight``.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the reduction K)")
    check_tensor("weight", weight, dtypes=(x.dtype,), ndim=2, device=x.device)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight [N, K] has K={weight.shape[1]} but x has K={x.shape[-1]}")
    chosen = resolve_backend("invariant_linear", backend, x.device)
    out = torch.ops.mm1.invariant_linear(x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous(), chosen)
    return out.view(*x.shape[:-1], weight.shape[0])
