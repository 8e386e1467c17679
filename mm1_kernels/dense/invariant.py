"""Position-independent building blocks: a row's result never depends on the other rows.

Consistent mode needs every token's arithmetic to be a function of that token alone, whatever
the row count, the row's position in the tensor or the call (prefill, decode, training). Two
CPU effects break that in plain torch, both measured on torch 2.13 (AVX512):

- Elementwise ops run a vectorized loop over the bulk of a tensor and a *scalar* loop over the
  tail; for fp32 ``sigmoid``/``silu`` the two differ in the last bit (3 of 64 values), so the
  same input gives different bits at the end of a 7-element tensor than inside a 64-element one.
  :func:`invariant_pointwise` pads the flattened input so every element takes the vectorized path.
- Reductions pick their order (vector accumulators, thread splits) from the shape: a row of
  40,000 fp32 values summed alone is split across threads and differs from the same row summed
  among others (rows of 64 or 6144 did not differ here, but nothing promises it).
  :func:`invariant_sum` is a pairwise tree of elementwise adds: the order is fixed by the reduced
  length alone, the same on every device and for every outer shape.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

# A multiple of every vectorized loop's step (2 vectors: 32 fp32 / 64 bf16 lanes on AVX512);
# times the thread count, so each thread's chunk of a parallel loop is a multiple of it too.
# Elements per call of an elementwise function on the CPU: a multiple of every vector loop's
# step (2 × 64 bytes at most) and under ATen's parallel grain (32,768 elements), so each call
# runs on one thread as whole vector steps, with no scalar tail anywhere.
CPU_SLICE = 16384


def invariant_pointwise(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` for an elementwise ``fn``, with every element through the same (vectorized) code.

    On the CPU, ATen runs an elementwise loop as vector steps plus a scalar tail, and the tail
    can round differently (fp32 sigmoid and silu do); with several threads every thread's
    chunk has its own tail, at positions that depend on n and the thread count. So the
    flattened input is zero-padded to a multiple of ``CPU_SLICE`` and ``fn`` runs once per
    slice (one thread, no tail). On other devices every element already runs the same code.
    Differentiable."""
    if x.device.type != "cpu":
        return fn(x)
    n = x.numel()
    padded = max(1, -(-n // CPU_SLICE)) * CPU_SLICE
    flat = F.pad(x.reshape(-1), (0, padded - n))
    out = torch.cat([fn(piece) for piece in flat.split(CPU_SLICE)])
    return out[:n].view(x.shape)


def invariant_sum(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sum over ``dim`` as a pairwise tree of elementwise adds (zero-padded to a power of two).

    Each output element is the same function of its own inputs for every outer shape and
    device: additions are exactly rounded, and the pairing depends only on ``x.shape[dim]``.
    Differentiable. (Adding the padding zeros is exact.)"""
    dim = dim % x.dim()
    n = x.shape[dim]
    p = 1 << max(0, n - 1).bit_length() if n else 1
    if p != n:
        pad = [0, 0] * (x.dim() - 1 - dim) + [0, p - n]
        x = F.pad(x, pad)
    while p > 1:
        p //= 2
        x = x.narrow(dim, 0, p) + x.narrow(dim, p, p)
    return x.squeeze(dim)
