"""The MoE router in one Triton kernel: fp32 logits ``[T, E]`` → top-k weights and ids.

One program owns ``BLOCK_T`` tokens and holds their whole rows of logits (E ≤ 1024, padded to
a power of two) in registers: softmax in fp32, then k rounds of "take the row maximum, and of
the columns equal to it the lowest index", masking each winner out for the next round. Taking
the minimum index among equal values is what makes ties go to the lower expert and the result
deterministic (no sort, no atomics). Renormalizing divides the k winners' probabilities by
their sum, so for k = 2 it equals sigmoid(l1 - l2) up to rounding. A row without a softmax
(a NaN or +inf logit, or all -inf) gets ids 0..k-1 and NaN weights, as in the reference;
without that rule its NaN probabilities match no maximum and the id would be BLOCK_E.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton_interpret import interpreted_with_fixes


@interpreted_with_fixes
@triton.jit
def moe_route_kernel(logits_ptr, weights_ptr, ids_ptr, T, E, stride_lt,
                     TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    col_ok = cols < E
    # Rows past T re-read row T-1 (never stored) so that no row is all -inf (NaN softmax).
    safe_rows = tl.minimum(rows, T - 1)
    ptrs = logits_ptr + safe_rows.to(tl.int64)[:, None] * stride_lt + cols[None, :]
    logits = tl.load(ptrs, mask=col_ok[None, :], other=float("-inf")).to(tl.float32)
    # Rows with no softmax (a NaN or +inf logit, or all -inf) get experts 0..k-1 and NaN
    # weights below. NaN is tested on its own: tl.max's NaN handling is unspecified.
    has_nan = tl.max((logits != logits).to(tl.int32), axis=1) > 0
    row_max = tl.max(logits, axis=1)
    bad_row = has_nan | (row_max == float("inf")) | (row_max == float("-inf"))
    p = tl.exp(logits - row_max[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    # Probabilities are ≥ 0, so -1 marks padded and already-chosen columns.
    p = tl.where(col_ok[None, :], p, -1.0)
    slot = tl.arange(0, BLOCK_K)
    top_w = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    top_i = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(p, axis=1)
        best_idx = tl.min(tl.where(p == best[:, None], cols[None, :], BLOCK_E), axis=1)
        top_w = tl.where(slot[None, :] == j, best[:, None], top_w)
        top_i = tl.where(slot[None, :] == j, best_idx[:, None], top_i)
        p = tl.where(cols[None, :] == best_idx[:, None], -1.0, p)
    if RENORMALIZE:
        top_w = top_w / tl.sum(top_w, axis=1)[:, None]
    top_w = tl.where(bad_row[:, None], float("nan"), top_w)
    top_i = tl.where(bad_row[:, None], slot[None, :], top_i)
    out_off = rows.to(tl.int64)[:, None] * TOP_K + slot[None, :]
    out_mask = row_ok[:, None] & (slot[None, :] < TOP_K)
    tl.store(weights_ptr + out_off, top_w, mask=out_mask)
    tl.store(ids_ptr + out_off, top_i, mask=out_mask)


def moe_route_triton(router_logits: torch.Tensor, top_k: int, renormalize: bool):
    T, E = router_logits.shape
    weights = torch.empty(T, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=router_logits.device)
    if T == 0:
        return weights, ids
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    block_e = max(16, triton.next_power_of_2(E))
    # ~4K logits per program: enough rows to amortize the launch at prefill, few enough
    # registers per thread at E = 32..1024.
    block_t = max(1, min(64, 4096 // block_e, triton.next_power_of_2(T)))
    grid = (triton.cdiv(T, block_t),)
    moe_route_kernel[grid](logits, weights, ids, T, E, logits.stride(0),
                           TOP_K=top_k, RENORMALIZE=renormalize, BLOCK_T=block_t, BLOCK_E=block_e,
                           BLOCK_K=max(2, triton.next_power_of_2(top_k)), num_warps=4)
    return weights, ids
