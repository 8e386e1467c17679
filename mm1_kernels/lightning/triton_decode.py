"""One lightning-attention decode step in Triton, on a slot-indexed fp32 state cache.

Memory-bound: each (row, head) reads and writes its ``[D, D]`` fp32 state once (128 KiB per
head at D=128) and touches only 3·D inputs. One program owns a ``[D, BV]`` slice of one head's
state, so B·H·(D/BV) programs stream the cache. The grid depends only on shapes and padding
rows are decided on the device, so the step has no host synchronization and can be captured
in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton_interpret import interpreted_with_fixes


@interpreted_with_fixes
@triton.jit
def lightning_decode_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, slopes_ptr, state_ptr, slot_ptr,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_ob, stride_oh,
    num_slots, H, D, DV,
    BD: tl.constexpr, BV: tl.constexpr, HAS_SLOTS: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    offs_d = tl.arange(0, BD)
    offs_v = iv * BV + tl.arange(0, BV)
    mask_d = offs_d < D
    mask_v = offs_v < DV
    o_ptrs = o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_v
    if HAS_SLOTS:
        slot = tl.load(slot_ptr + b).to(tl.int64)
    else:
        slot = b.to(tl.int64)
    if slot < 0:  # padding row: state untouched, output zero
        tl.store(o_ptrs, tl.zeros([BV], dtype=tl.float32).to(o_ptr.dtype.element_ty), mask=mask_v)
        return
    if slot >= num_slots:  # only reachable when the host check was skipped (graph capture)
        tl.store(o_ptrs, tl.full([BV], float("nan"), tl.float32).to(o_ptr.dtype.element_ty), mask=mask_v)
        return
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + b.to(tl.int64) * stride_kb + h * stride_kh + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + b.to(tl.int64) * stride_vb + h * stride_vh + offs_v, mask=mask_v, other=0.0).to(tl.float32)
    decay = tl.exp(-tl.load(slopes_ptr + h).to(tl.float32))
    s_ptrs = state_ptr + (slot * H + h) * D * DV + (offs_d[:, None] * DV + offs_v[None, :])
    s_mask = mask_d[:, None] & mask_v[None, :]
    S = tl.load(s_ptrs, mask=s_mask, other=0.0)
    S = S * decay + k[:, None] * v[None, :]
    tl.store(s_ptrs, S, mask=s_mask)
    o = tl.sum(q[:, None] * S, axis=0)
    tl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=mask_v)


def lightning_decode_triton(q, k, v, slopes, state_cache, slot_ids):
    """Triton decode on validated ``[B, H, D]`` inputs; see ``mm1_kernels.lightning_decode``."""
    B, H, D = q.shape
    DV = v.shape[-1]
    o = torch.empty(B, H, DV, dtype=q.dtype, device=q.device)
    if B == 0:
        return o
    BD = max(16, triton.next_power_of_2(D))
    # Small batches get narrower value tiles so that B·H·(DV/BV) programs still fill the GPU.
    BV = 32 if B * H >= 256 else 16
    BV = min(BV, max(16, triton.next_power_of_2(DV)))
    grid = (B, H, triton.cdiv(DV, BV))
    lightning_decode_kernel[grid](
        q, k, v, o, slopes, state_cache, slot_ids if slot_ids is not None else o,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        o.stride(0), o.stride(1), state_cache.shape[0], H, D, DV,
        BD=BD, BV=BV, HAS_SLOTS=slot_ids is not None, num_warps=4)
    return o
