"""Consistent mode's arithmetic for the model's layers (``MiniMaxM1ForCausalLM(consistent=True)``).

Every token's logprob must be the same bits from ``generate`` (varlen prefill, then decode steps
in any slot) and from the training forward (``logprobs``), whatever else is in the batch. So
every step that reduces is computed by an order fixed per token:

- projections and the router: ``mk.invariant_linear`` (fixed tiles / fixed-shape row blocks);
- RMSNorm: the sum of squares as a fixed pairwise tree (``invariant_sum``);
- silu / sigmoid / exp / cos / sin on the CPU: ``invariant_pointwise`` (no vectorized/scalar-tail split);
- softmax attention: :func:`softmax_attention`, one function for training, prefill and decode;
- MoE: ``mk.fused_moe(..., consistent=True)``; the head is batch invariant already.

Default mode keeps its fast paths; each call here takes ``step`` (``StepInfo``) and falls back
to them unless ``step.consistent``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import mm1_kernels as mk

# Keys per block of the consistent softmax attention: a query's keys are always split at the
# same absolute positions, whatever the context length of the call.
KEY_BLOCK = 64
# Queries per pass: bounds the [N, H, rows, KEY_BLOCK, D] products (rows are independent, so
# the split changes no bit).
QUERY_BLOCK = 64


def linear(x: torch.Tensor, layer: nn.Linear, step) -> torch.Tensor:
    """``layer(x)`` (bias-free), through ``mk.invariant_linear`` in consistent mode."""
    if not step.consistent:
        return layer(x)
    return mk.invariant_linear(x, layer.weight, backend=step.backend_for("invariant_linear"))


def activation(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, step) -> torch.Tensor:
    """An elementwise ``fn`` (``F.silu``, ``torch.sigmoid``, ...), position independent in
    consistent mode (see ``mk.invariant_pointwise``)."""
    return mk.invariant_pointwise(fn, x) if step.consistent else fn(x)


def rms_norm_consistent(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """M1's RMSNorm (fp32, round to x's dtype, scale) with a fixed-order sum of squares and
    ``1 / sqrt`` (both correctly rounded on every path) instead of ``rsqrt``."""
    xf = x.float()
    ms = mk.invariant_sum(xf * xf, -1) / x.shape[-1]
    return weight * (xf * (1.0 / torch.sqrt(ms + eps))[..., None]).to(x.dtype)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """Causal GQA attention of each query over the keys at positions ``<= q_pos``, batch invariant.

    ``q [N, Tq, H, D]``, ``k``/``v [N, L, KVH, D]`` (key j at position j), ``q_pos [N, Tq]``
    (every ``q_pos < L``); returns ``[N, Tq, H, D]`` in q's dtype. fp32 throughout.

    One function for training (``L = Tq``), prefill (cached keys, several sequences) and decode
    (``Tq = 1``), so a query's result depends only on its own row and keys:
    - scores: ``invariant_sum`` over D of elementwise products (no GEMM whose kernel follows Tq);
    - the row max is exact in any order; ``exp`` runs through ``invariant_pointwise``;
    - keys are taken in blocks of ``KEY_BLOCK`` at fixed absolute positions; within a block
      ``invariant_sum`` reduces, and the blocks are added in increasing order, a block only when
      it holds one of the query's keys (so keys past the query, present in training and absent
      in decode, add nothing, not even a signed zero).
    Two passes (max, then exp and sums) instead of an online softmax: the max over the valid
    keys is the same whatever the number of blocks, so no rescaling step can differ.
    Queries go ``QUERY_BLOCK`` at a time. Differentiable (plain torch ops; the row max is held
    constant, as softmax allows).
    """
    Tq = q.shape[1]
    if Tq > QUERY_BLOCK:
        return torch.cat([softmax_attention(q[:, i:i + QUERY_BLOCK], k, v, q_pos[:, i:i + QUERY_BLOCK], scale)
                          for i in range(0, Tq, QUERY_BLOCK)], 1)
    N, Tq, H, D = q.shape
    L, KVH = k.shape[1], k.shape[2]
    nb = -(-L // KEY_BLOCK)
    pad = nb * KEY_BLOCK - L
    qf = q.float().transpose(1, 2)                                              # [N, H, Tq, D]
    kf = F.pad(k.float(), (0, 0, 0, 0, 0, pad)).repeat_interleave(H // KVH, dim=2).transpose(1, 2)
    vf = F.pad(v.float(), (0, 0, 0, 0, 0, pad)).repeat_interleave(H // KVH, dim=2).transpose(1, 2)
    kpos = torch.arange(nb * KEY_BLOCK, device=q.device)
    valid = (kpos[None, None, :] <= q_pos[:, :, None])[:, None]                 # [N, 1, Tq, Lp]
    blocks = [slice(b * KEY_BLOCK, (b + 1) * KEY_BLOCK) for b in range(nb)]
    s = torch.cat([mk.invariant_sum(qf[:, :, :, None, :] * kf[:, :, None, blk, :], -1) for blk in blocks], -1)
    s = torch.where(valid, s * scale, float("-inf"))
    p = mk.invariant_pointwise(torch.exp, s - s.amax(-1, keepdim=True).detach())
    o = lsum = None
    for b, blk in enumerate(blocks):
        pb = p[..., blk]
        prod = torch.where(valid[..., blk, None], pb[..., None] * vf[:, :, None, blk, :], 0.0)
        ob, lb = mk.invariant_sum(prod, -2), mk.invariant_sum(pb, -1)           # [N,H,Tq,D], [N,H,Tq]
        if b == 0:
            o, lsum = ob, lb
        else:
            live = (b * KEY_BLOCK <= q_pos)[:, None]                            # [N, 1, Tq]
            o = torch.where(live[..., None], o + ob, o)
            lsum = torch.where(live, lsum + lb, lsum)
    return (o / lsum[..., None]).to(q.dtype).transpose(1, 2)
