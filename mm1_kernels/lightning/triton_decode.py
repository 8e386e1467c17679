"""Lightning-attention decode in Triton, on a slot-indexed fp32 state cache: T ≥ 1 tokens per slot.

Memory-bound: each (row, head) reads and writes its ``[D, D]`` fp32 state once (128 KiB per
head at D=128) and touches only 3·D inputs. One program owns a ``[D, BV]`` slice of one head's
state, so B·H·(D/BV) programs stream the cache. The grid depends only on shapes and padding
rows are decided on the device, so the step has no host synchronization and can be captured
in a CUDA graph.

Several tokens per slot (speculative verify, prefix caching): the program walks the T tokens in
order with its state slice in registers, writes each token's output and, on request, the state
after each token (``[B, T, H, D, Dv]`` fp32), and writes the slot back once at the end. The
cache traffic is the same as one step; the per-token states cost T × the state size in writes.
For sm_90a at D=128 (ptxas): the one-token step (``ONE_TOKEN``, straight-line code) 72 registers,
the T-token loop with per-token states 104-110, no spills.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton_interpret import interpreted_with_fixes


@interpreted_with_fixes
@triton.jit
def lightning_decode_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, slopes_ptr, state_ptr, slot_ptr, states_ptr,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    num_slots, T, H, D, DV,
    BD: tl.constexpr, BV: tl.constexpr, HAS_SLOTS: tl.constexpr, STORE_STATES: tl.constexpr,
    ONE_TOKEN: tl.constexpr = False,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    offs_d = tl.arange(0, BD)
    offs_v = iv * BV + tl.arange(0, BV)
    mask_d = offs_d < D
    mask_v = offs_v < DV
    s_offs = offs_d[:, None] * DV + offs_v[None, :]
    s_mask = mask_d[:, None] & mask_v[None, :]
    o_ptrs = o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_v
    # states [B, T, H, D, DV] contiguous: token t of row b at ((b T + t) H + h) D DV.
    head_size = D * DV
    states_ptrs = states_ptr + (b.to(tl.int64) * T * H + h) * head_size + s_offs
    if HAS_SLOTS:
        slot = tl.load(slot_ptr + b).to(tl.int64)
    else:
        slot = b.to(tl.int64)
    # A padding row (slot < 0): state untouched, outputs (and per-token states) zero. An
    # out-of-range slot is only reachable when the host check was skipped (graph capture):
    # state untouched, NaN outputs.
    if (slot < 0) | (slot >= num_slots):
        fill = tl.where(slot < 0, 0.0, float("nan"))
        o_fill = (tl.zeros([BV], dtype=tl.float32) + fill).to(o_ptr.dtype.element_ty)
        for _ in range(T):
            tl.store(o_ptrs, o_fill, mask=mask_v)
            o_ptrs += stride_ot
            if STORE_STATES:
                tl.store(states_ptrs, tl.zeros([BD, BV], dtype=tl.float32) + fill, mask=s_mask)
                states_ptrs += H * head_size
        return
    q_ptrs = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_d
    k_ptrs = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + offs_d
    v_ptrs = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + offs_v
    decay = tl.exp(-tl.load(slopes_ptr + h).to(tl.float32))
    cache_ptrs = state_ptr + (slot * H + h) * head_size + s_offs
    S = tl.load(cache_ptrs, mask=s_mask, other=0.0)
    if ONE_TOKEN:  # a compile-time trip count of 1 keeps the one-token step straight-line code
        T = 1
    for _ in range(T):
        q = tl.load(q_ptrs, mask=mask_d, other=0.0).to(tl.float32)
        k = tl.load(k_ptrs, mask=mask_d, other=0.0).to(tl.float32)
        v = tl.load(v_ptrs, mask=mask_v, other=0.0).to(tl.float32)
        S = S * decay + k[:, None] * v[None, :]
        o = tl.sum(q[:, None] * S, axis=0)
        tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=mask_v)
        if STORE_STATES:
            tl.store(states_ptrs, S, mask=s_mask)
            states_ptrs += H * head_size
        q_ptrs += stride_qt
        k_ptrs += stride_kt
        v_ptrs += stride_vt
        o_ptrs += stride_ot
    tl.store(cache_ptrs, S, mask=s_mask)


def lightning_decode_triton(q, k, v, slopes, state_cache, slot_ids, return_states: bool = False):
    """Triton decode on validated inputs; see ``mm1_kernels.lightning_decode``.

    q, k: ``[B, T, H, D]`` (or ``[B, H, D]``, one token); v likewise with Dv. Returns ``o`` shaped
    like q with Dv last, or ``(o, states)`` with ``return_states``: fp32 ``[B, T, H, D, Dv]``
    (``[B, H, D, Dv]`` for 3-d inputs), the state after each token.
    """
    one_token = q.dim() == 3
    if one_token:
        q, k, v = q[:, None], k[:, None], v[:, None]
    B, T, H, D = q.shape
    DV = v.shape[-1]
    o = torch.empty(B, T, H, DV, dtype=q.dtype, device=q.device)
    states = (torch.empty(B, T, H, D, DV, dtype=torch.float32, device=q.device) if return_states else None)
    if B and T:
        BD = max(16, triton.next_power_of_2(D))
        # Small batches get narrower value tiles so that B·H·(DV/BV) programs still fill the GPU.
        BV = 32 if B * H >= 256 else 16
        BV = min(BV, max(16, triton.next_power_of_2(DV)))
        grid = (B, H, triton.cdiv(DV, BV))
        lightning_decode_kernel[grid](
            q, k, v, o, slopes, state_cache, slot_ids if slot_ids is not None else o,
            states if states is not None else state_cache,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            state_cache.shape[0], T, H, D, DV,
            BD=BD, BV=BV, HAS_SLOTS=slot_ids is not None, STORE_STATES=return_states, ONE_TOKEN=T == 1,
            num_warps=4)
    if one_token:
        o = o[:, 0]
        states = states[:, 0] if states is not None else None
    return (o, states) if return_states else o
