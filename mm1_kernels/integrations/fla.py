"""An fla ``chunk_simple_gla``-compatible entry on this package's lightning kernels.

Semantics follow ``fla-org/flash-linear-attention`` ``fla/ops/simple_gla/chunk.py`` as read at
commit ``07784bc00b9f`` (``chunk_simple_gla(q, k, v, g, g_gamma, scale, initial_state,
output_final_state, state_v_first, cu_seqlens, cu_seqlens_cpu, **kwargs)``: ``[B, T, H, K]``
only, ``head_first`` removed, default ``scale = K ** -0.5``, returns ``(o in q's dtype,
final_state fp32 [N, H, K, V] or None)``) plus the ``head_first`` argument of its earlier
releases (``head_first=True``: q, k, v and o ``[B, H, T, K]``).

Simple GLA with a head-wise constant log decay ``g_gamma`` is M1's lightning attention:
``S_t = exp(g_gamma) S_{t-1} + k_t^T v_t``, ``o_t = scale · q_t S_t``, so
``g_gamma = -slopes`` and ``scale = 1.0`` (docs/m1_math.md §3.4). Per-token gates ``g`` are
not M1's math and raise NotImplementedError.

Importing this module never imports fla.
"""
from __future__ import annotations

from typing import Optional

import torch

import mm1_kernels as mk

__all__ = ["chunk_simple_gla"]


def chunk_simple_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: Optional[torch.Tensor] = None,
                     g_gamma: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                     initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
                     cu_seqlens: Optional[torch.Tensor] = None, head_first: bool = False,
                     state_v_first: bool = False, cu_seqlens_cpu: Optional[torch.Tensor] = None, *,
                     backend: Optional[str] = None, **kwargs):
    """fla's ``chunk_simple_gla`` for a constant per-head decay (``g_gamma``), on
    :func:`mm1_kernels.lightning_attention`.

    Args (fla's):
        q, k: ``[B, T, H, K]`` (``[B, H, T, K]`` with ``head_first=True``); v likewise with V.
        g: per-token log gates: NotImplementedError (data-dependent gating is not M1's math).
        g_gamma: ``[H]`` log decay per head (``<= 0``); None means no decay (plain linear
            attention). For M1: ``g_gamma = -lightning_slopes(...)``.
        scale: multiplies q; default ``K ** -0.5`` as fla. M1 uses ``scale=1.0``.
        initial_state: ``[N, H, K, V]`` (``[N, H, V, K]`` with ``state_v_first``), any float dtype.
        output_final_state: also return the final states.
        cu_seqlens: ``[N + 1]`` offsets of varlen sequences packed with ``B == 1``.
        cu_seqlens_cpu: fla's host copy; accepted and unused.

    Returns ``(o, final_state)``: o shaped like v in q's layout and dtype; final_state fp32
    ``[N, H, K, V]`` (``[N, H, V, K]`` with ``state_v_first``) or None. Differentiable w.r.t.
    q, k, v and initial_state (through mm1_kernels.lightning_attention's backward); a g_gamma that
    requires grad raises NotImplementedError.
    """
    if g is not None:
        raise NotImplementedError("g (per-token data-dependent gates) is not supported by mm1_kernels' "
                                  "chunk_simple_gla: M1's decay is constant per head; pass g_gamma")
    if kwargs:
        raise TypeError(f"unexpected keyword arguments: {sorted(kwargs)}")
    if g_gamma is not None and g_gamma.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError("mm1_kernels' chunk_simple_gla has no gradient for g_gamma (M1's decays are "
                                  "constants): pass g_gamma.detach()")
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D ([B, T, H, K] or, head_first, [B, H, T, K]), got {list(q.shape)}")
    if head_first:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    H, K = q.shape[2], q.shape[3]
    if g_gamma is None:
        slopes = torch.zeros(H, dtype=torch.float32, device=q.device)
    else:
        if g_gamma.numel() != H:
            raise ValueError(f"g_gamma must hold one log decay per head ({H}), got shape {list(g_gamma.shape)}")
        slopes = (-g_gamma.reshape(H).to(torch.float32)).contiguous()
    scale = K ** -0.5 if scale is None else float(scale)
    if scale != 1.0:
        q = (q.float() * scale).to(q.dtype)
    if initial_state is not None:
        if state_v_first:
            initial_state = initial_state.transpose(-1, -2)
        initial_state = initial_state.to(torch.float32).contiguous()
    o, final = mk.lightning_attention(q, k, v, slopes, initial_state=initial_state,
                                      output_final_state=bool(output_final_state), cu_seqlens=cu_seqlens,
                                      backend=backend)
    if final is not None and state_v_first:
        final = final.transpose(-1, -2).contiguous()
    if head_first:
        o = o.transpose(1, 2).contiguous()
    return o, final
