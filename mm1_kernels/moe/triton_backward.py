"""Fused MoE backward in Triton: recomputed gate/up, fused SiLU·mul backward, grouped GEMMs.

Per (token t, slot j) *entry* with local expert e, ``a = x[t]``, ``g = W1 a``, ``u = W3 a``,
``h = silu(g)·u``, routing weight ``w`` and ``dy = dOut[t]`` (``reference.fused_moe_backward_reference``
is the same math in torch)::

    d w = <h, W2ᵀ dy>      dh = w · W2ᵀ dy      dg = dh·u·σ(g)(1 + g(1 − σ(g)))      du = dh·silu(g)
    dx[t] += W13ᵀ [dg; du]       dW13[e] += [dg; du] aᵀ       dW2[e] += dy (w·h)ᵀ

What the forward saves: its inputs only (x, the weights, topk_weights/ids, scales, map) — no
activation. The backward recomputes the routing metadata (``moe_align``, one small launch,
with the backward's own row tile) and the gate/up pre-activations (GEMM 1 again: 4·hidden·I
of the forward's 6·hidden·I FLOPs per routed token; the backward proper does 12). At
T = 8192, hidden 6144, I = 9216, top-2 in bf16, saving them would hold ``T·k·2I`` = 302 M
values, 604 MB per layer (h alone 302 MB), 48 GB over M1's 80 MoE layers; recomputing saves
all of it. Transient scratch of one layer's backward at that shape
(M = T·k + E·(BLOCK_M − 1) ≤ 20,448 padded rows at E = 32, BLOCK_M = 128): ``dgu`` [M, 2I]
754 MB and ``hw`` [M, I] 377 MB in x's dtype, fp32 ``rows`` [T·k, hidden] 403 MB, fp32
routing-gradient partials [I / BLOCK_N, T·k] 9 MB — 1.5 GB, freed when the layer's backward
returns (the weight gradients themselves, 7.2 + 3.6 GB in bf16, are the caller's).

Seven launches, no host synchronization, grids sized from shapes alone:

1. ``moe_align`` (the forward's kernel, recomputed): entries grouped by expert, padded to
   ``BLOCK_M``.
2. ``moe_bwd_act_kernel``: program (row tile, column tile of I), in the forward's grouped
   launch order (``grouped_tile``: GROUP_M row tiles × all column tiles). One loop over hidden
   accumulates three fp32 tiles side by side: the gate and up pre-activations (x rows @ the
   gate/up rows of w13[e], recomputed) and ``W2ᵀ dy`` (dy rows @ the tile's columns of w2[e]).
   The epilogue is the fused SiLU·mul backward: it stores ``[dg; du]`` (``dgu [M, 2I]``, x's
   dtype: the tensor-core operand of the next GEMMs), ``w·h`` (``hw [M, I]``, for dW2), and the
   tile's partial ``Σ_n h·W2ᵀdy`` of each entry's routing gradient (fp32, one slot per column
   tile: no atomics).
3. ``moe_bwd_dx_kernel``: program (row tile, column tile of hidden): ``dgu @ w13[e]`` over the
   2I reduction (the transposed GEMM 1: gate and up rows at once), stored as fp32 row
   ``entry`` of ``rows [T·k, hidden]``; then 4. the forward's ``moe_combine_kernel`` sums a
   token's k rows in slot order and casts (a slot the map places on another rank adds exactly
   zero; an invalid id gives a NaN row, as in the forward).
5. ``moe_bwd_route_grad_kernel``: each entry's routing gradient = its partials summed over the
   column tiles in order (0 for a non-local slot, NaN for an invalid one).
6. and 7. ``moe_bwd_dw_kernel`` (dW13 = Σ dguᵀ x, then dW2 = Σ dyᵀ hw; skipped for frozen or
   int8 weights): program (output tile, expert), expert slowest; it loops over its expert's
   row tiles in order, accumulating the [P, Q] tile in fp32 registers over every entry of the
   expert, and stores it once. An expert with no entry stores zeros. Rows are gathered by
   token (x, dy) or read by padded row (dgu, hw); padding rows are masked to zero. The
   expert's tile range is found in-kernel from ``block_expert`` (tiles are in expert order).

sm_90a at M1's shape (T = 4096, ``python -m profiles.static --case
moe-backward-I9216-T4096-bf16``; Triton 3.6 / 3.9): act 103 / 124 registers on 8 warps,
120 KiB shared (3 stages; 1 CTA per SM), dx 122 / 123, dW 170-196 on 4 warps; no spills
(tests/test_moe_backward.py compiles them).

Every reduction has a fixed order and nothing is accumulated with atomics: bitwise
deterministic. fp32 accumulation everywhere; fp32 inputs use ``input_precision="ieee"``.

int8 experts (frozen: no dW): ``dx`` and the routing gradient only. The gate/up scales multiply
the recomputed accumulators as in the forward; ``W2ᵀ dy`` reads w2 tiles dequantized in fp32
(``q · scale`` per hidden row) then cast to the activation dtype; ``dx`` multiplies ``dgu`` by the
w13 row scales in the epilogue of step 2, so step 3 reads int8 weights as they are.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton_interpret import interpreted_with_fixes
from .triton_fused_moe import fit_stages, grouped_tile, local_expert, moe_align, moe_combine_kernel


@interpreted_with_fixes
@triton.jit
def moe_bwd_act_kernel(x_ptr, dy_ptr, w13_ptr, s13_ptr, w2_ptr, s2_ptr, topk_w_ptr,
                       sorted_ids_ptr, block_expert_ptr, dgu_ptr, hw_ptr, dtw_part_ptr,
                       num_m, N, I, H, stride_xt, stride_dyt, stride_w13e, stride_w13n,
                       stride_s13e, stride_s13n, stride_w2e, stride_w2n, stride_s2e, stride_s2n,
                       TOP_K: tl.constexpr, QUANT: tl.constexpr, STORE_HW: tl.constexpr,
                       PRECISION: tl.constexpr, GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Grouped launch order (the forward's): GROUP_M row tiles × all column tiles, row tile
    # fastest. The group's x and dy rows stay in L2 across its column sweep (each is read by
    # I / BLOCK_N programs), and an expert's adjacent row tiles share each weight column tile.
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_m, tl.cdiv(I, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    entry = tl.load(sorted_ids_ptr + rows)
    row_ok = entry < N
    token = entry // TOP_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + token.to(tl.int64)[:, None] * stride_xt + offs_k[None, :]
    dy_ptrs = dy_ptr + token.to(tl.int64)[:, None] * stride_dyt + offs_k[None, :]
    e64 = expert.to(tl.int64)
    # [BLOCK_K, BLOCK_N] views: gate rows n and up rows I + n of w13[e] (hidden contiguous),
    # and w2[e][k, n] (I contiguous): the tile's columns of W2ᵀ.
    g_ptrs = w13_ptr + e64 * stride_w13e + offs_n.to(tl.int64)[None, :] * stride_w13n + offs_k[:, None]
    u_ptrs = g_ptrs + I * stride_w13n
    d_ptrs = w2_ptr + e64 * stride_w2e + offs_k.to(tl.int64)[:, None] * stride_w2n + offs_n[None, :]
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_d = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_ok = offs_k < H - k0
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        dy = tl.load(dy_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
        u = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
        d = tl.load(d_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
        if QUANT:
            # Through fp32 (see moe_gate_up_kernel). w2's scale is per hidden row, i.e. along
            # this reduction, so it cannot wait for the epilogue: dequantize the tile.
            g = g.to(tl.float32).to(a.dtype)
            u = u.to(tl.float32).to(a.dtype)
            s2 = tl.load(s2_ptr + e64 * stride_s2e + (k0 + offs_k) * stride_s2n, mask=k_ok,
                         other=0.0)
            d = (d.to(tl.float32) * s2[:, None]).to(dy.dtype)
        acc_g = tl.dot(a, g, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, u, acc_u, input_precision=PRECISION)
        acc_d = tl.dot(dy, d, acc_d, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        dy_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
        d_ptrs += BLOCK_K * stride_w2n
    if QUANT:
        s_ptrs = s13_ptr + e64 * stride_s13e + offs_n * stride_s13n
        s_g = tl.load(s_ptrs, mask=n_ok, other=0.0)[None, :]
        s_u = tl.load(s_ptrs + I * stride_s13n, mask=n_ok, other=0.0)[None, :]
        acc_g *= s_g
        acc_u *= s_u
    route_w = tl.load(topk_w_ptr + entry, mask=row_ok, other=0.0)[:, None]
    sig = tl.sigmoid(acc_g)
    act = acc_g * sig
    h = act * acc_u
    # This column tile's share of d w = <h, W2ᵀ dy>; masked columns are 0 on both sides.
    tl.store(dtw_part_ptr + pid_n.to(tl.int64) * N + entry, tl.sum(h * acc_d, axis=1), mask=row_ok)
    dh = acc_d * route_w
    dg = dh * acc_u * sig * (1.0 + acc_g * (1.0 - sig))
    du = dh * act
    if QUANT:  # dx = Σ_n dgu_n · (q_n · s_n): fold the row scale here, read q as it is later
        dg *= s_g
        du *= s_u
    out_mask = row_ok[:, None] & n_ok[None, :]
    dgu_ptrs = dgu_ptr + rows.to(tl.int64)[:, None] * (2 * I) + offs_n[None, :]
    tl.store(dgu_ptrs, dg.to(dgu_ptr.dtype.element_ty), mask=out_mask)
    tl.store(dgu_ptrs + I, du.to(dgu_ptr.dtype.element_ty), mask=out_mask)
    if STORE_HW:
        hw_ptrs = hw_ptr + rows.to(tl.int64)[:, None] * I + offs_n[None, :]
        tl.store(hw_ptrs, (h * route_w).to(hw_ptr.dtype.element_ty), mask=out_mask)


@interpreted_with_fixes
@triton.jit
def moe_bwd_dx_kernel(dgu_ptr, w13_ptr, rows_out_ptr, sorted_ids_ptr, block_expert_ptr,
                      N, H, K, stride_we, stride_wn,
                      QUANT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """rows[entry] = dgu[row] @ w13[e] over the K = 2I reduction (gate and up rows at once)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    entry = tl.load(sorted_ids_ptr + rows)
    row_ok = entry < N
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = dgu_ptr + rows.to(tl.int64)[:, None] * K + offs_k[None, :]
    b_ptrs = (w13_ptr + expert.to(tl.int64) * stride_we + offs_k.to(tl.int64)[:, None] * stride_wn
              + offs_n[None, :])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
        if QUANT:
            b = b.to(tl.float32).to(a.dtype)  # exact; the scales are in dgu already
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_wn
    out_ptrs = rows_out_ptr + entry.to(tl.int64)[:, None] * H + offs_n[None, :]
    tl.store(out_ptrs, acc, mask=row_ok[:, None] & n_ok[None, :])


@interpreted_with_fixes
@triton.jit
def moe_bwd_dw_kernel(a_ptr, b_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr, num_blocks,
                      N, P, Q, stride_a, stride_b, stride_oe, stride_op,
                      A_BY_TOKEN: tl.constexpr, B_BY_TOKEN: tl.constexpr, TOP_K: tl.constexpr,
                      PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
                      BLOCK_Q: tl.constexpr, BLOCK_B: tl.constexpr):
    """out[e] [P, Q] = Σ over the expert's entries r of A[r]ᵀ B[r], in row-tile order.

    A row of A (or B) is the entry's token row (``*_BY_TOKEN``: x or dy, row stride given) or
    its padded row of the backward's scratch (dgu or hw)."""
    # Grid (Q tiles, P tiles, E), expert slowest: the programs of one expert run together, so
    # its rows of A and B (a few MB at M1's shape) are read from HBM about once and re-read
    # from L2 by the expert's other output tiles.
    offs_q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    e = tl.program_id(2)
    p_ok = offs_p < P
    q_ok = offs_q < Q
    # The expert's row tiles are contiguous: [first, first + count) in block_expert order.
    first = 0
    count = 0
    for b0 in range(0, num_blocks, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        be = tl.load(block_expert_ptr + b, mask=b < num_blocks, other=-1)
        first += tl.sum(((be >= 0) & (be < e)).to(tl.int32), axis=0)
        count += tl.sum((be == e).to(tl.int32), axis=0)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    offs_m = tl.arange(0, BLOCK_M)
    for tile in range(first, first + count):
        rows = tile * BLOCK_M + offs_m
        entry = tl.load(sorted_ids_ptr + rows)
        ok = entry < N
        if A_BY_TOKEN:
            a_rows = (entry // TOP_K).to(tl.int64)
        else:
            a_rows = rows.to(tl.int64)
        if B_BY_TOKEN:
            b_rows = (entry // TOP_K).to(tl.int64)
        else:
            b_rows = rows.to(tl.int64)
        # Aᵀ loaded directly as [BLOCK_P, BLOCK_M]; padding rows (unwritten scratch) masked.
        a = tl.load(a_ptr + a_rows[None, :] * stride_a + offs_p[:, None],
                    mask=p_ok[:, None] & ok[None, :], other=0.0)
        b = tl.load(b_ptr + b_rows[:, None] * stride_b + offs_q[None, :],
                    mask=ok[:, None] & q_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    out_ptrs = (out_ptr + e.to(tl.int64) * stride_oe + offs_p.to(tl.int64)[:, None] * stride_op
                + offs_q[None, :])
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])


@interpreted_with_fixes
@triton.jit
def moe_bwd_route_grad_kernel(part_ptr, ids_ptr, map_ptr, out_ptr, N, E, G, num_parts,
                              HAS_MAP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    e = local_expert(tl.load(ids_ptr + offs, mask=ok, other=0), map_ptr, E, G, HAS_MAP)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for p in range(0, num_parts):
        acc += tl.load(part_ptr + p * N + offs, mask=ok & (e >= 0), other=0.0)
    # Only placed entries have partials: a non-local slot gets exactly 0, an invalid one NaN.
    acc = tl.where(e >= 0, acc, tl.where(e == -1, 0.0, float("nan")))
    tl.store(out_ptr + offs, acc, mask=ok)


def backward_config(inter: int, hidden: int, tokens: int, top_k: int):
    """Tiles of the backward. Training batches are large, so the row tile grows with the
    entries per expert like the forward's. The activation kernel holds three fp32
    accumulators (gate, up, W2ᵀdy), so its column tile stays at 64 and it runs on 8 warps
    (sm_90a, 64-row tiles: 229-240 registers on 4 warps, and int8 weights spill 4 bytes at 255
    on Triton 3.9; 128-130 on 8). Not tuned on a GPU yet. Tiles are clipped to the problem
    (powers of two, ≥ 16 for tl.dot)."""
    n = tokens * top_k
    bm = 16 if n <= 128 else (64 if n <= 8192 else 128)
    p2 = lambda v: max(16, triton.next_power_of_2(v))  # noqa: E731
    warps = 4 if bm <= 64 else 8
    return dict(BLOCK_M=bm, BLOCK_N1=min(64, p2(inter)), BLOCK_K1=min(64, p2(hidden)),
                BLOCK_N2=min(128, p2(hidden)), BLOCK_K2=min(64, p2(2 * inter)),
                BLOCK_P=min(128, p2(max(hidden, 2 * inter))), BLOCK_Q=min(128, p2(min(hidden, inter))),
                GROUP_M=16, num_warps=warps, act_warps=8, num_stages=3)


def fused_moe_backward_triton(grad_out, x, w13, w2, topk_weights, topk_ids, w13_scale=None,
                              w2_scale=None, expert_map=None, need_weight_grads=True):
    """``(dx, dw13, dw2, dtopk_weights)``: dx in x's dtype, dw13/dw2 in the weights' dtype (None
    when not wanted or int8), dtopk_weights fp32 ``[T, k]``."""
    T, hidden = x.shape
    E, two_i, _ = w13.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    n = T * top_k
    quant = w13.dtype == torch.int8
    want_w = need_weight_grads and not quant
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    cfg = backward_config(inter, hidden, T, top_k)
    bm = cfg["BLOCK_M"]
    device = x.device
    ids = topk_ids.contiguous()
    route_w = topk_weights.to(torch.float32).contiguous()
    dy = grad_out.to(x.dtype)
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    has_map = expert_map is not None
    emap = expert_map.contiguous() if has_map else ids
    G = emap.shape[0] if has_map else E
    sorted_ids, block_expert, num_blocks = moe_align(ids, E, bm, emap if has_map else None)

    act_bytes = x.element_size()
    grid_n1 = triton.cdiv(inter, cfg["BLOCK_N1"])
    dgu = torch.empty(num_blocks * bm, two_i, dtype=x.dtype, device=device)
    hw = torch.empty(num_blocks * bm if want_w else 0, inter, dtype=x.dtype, device=device)
    parts = torch.empty(grid_n1, n, dtype=torch.float32, device=device)
    s13 = w13_scale if quant else x  # unused pointers when not quantized
    s2 = w2_scale if quant else x
    s13_strides = tuple(w13_scale.stride()) if quant else (0, 0)
    s2_strides = tuple(w2_scale.stride()) if quant else (0, 0)
    stages = fit_stages(cfg["num_stages"], bm, cfg["BLOCK_N1"], cfg["BLOCK_K1"], 3, 2 * act_bytes,
                        w13.element_size())
    moe_bwd_act_kernel[(num_blocks * grid_n1,)](
        x, dy, w13, s13, w2, s2, route_w, sorted_ids, block_expert, dgu, hw if want_w else dgu,
        parts, num_blocks, n, inter, hidden, x.stride(0), dy.stride(0), w13.stride(0), w13.stride(1),
        *s13_strides, w2.stride(0), w2.stride(1), *s2_strides,
        TOP_K=top_k, QUANT=quant, STORE_HW=want_w, PRECISION=precision, GROUP_M=cfg["GROUP_M"],
        BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N1"], BLOCK_K=cfg["BLOCK_K1"],
        num_warps=cfg["act_warps"], num_stages=stages)

    rows = torch.empty(n, hidden, dtype=torch.float32, device=device)
    stages = fit_stages(cfg["num_stages"], bm, cfg["BLOCK_N2"], cfg["BLOCK_K2"], 1, act_bytes,
                        w13.element_size())
    moe_bwd_dx_kernel[(num_blocks, triton.cdiv(hidden, cfg["BLOCK_N2"]))](
        dgu, w13, rows, sorted_ids, block_expert, n, hidden, two_i, w13.stride(0), w13.stride(1),
        QUANT=quant, PRECISION=precision, BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N2"],
        BLOCK_K=cfg["BLOCK_K2"], num_warps=cfg["num_warps"], num_stages=stages)
    dx = torch.empty(T, hidden, dtype=x.dtype, device=device)
    block_h = min(1024, max(16, triton.next_power_of_2(hidden)))
    moe_combine_kernel[(T, triton.cdiv(hidden, block_h))](
        rows, ids, emap, dx, hidden, E, G, dx.stride(0),
        TOP_K=top_k, HAS_MAP=has_map, BLOCK_H=block_h, num_warps=4)

    dtw = torch.empty(T, top_k, dtype=torch.float32, device=device)
    block = 1024
    moe_bwd_route_grad_kernel[(triton.cdiv(n, block),)](
        parts, ids, emap, dtw, n, E, G, grid_n1, HAS_MAP=has_map, BLOCK=block, num_warps=4)

    dw13 = dw2 = None
    if want_w:
        bp, bq = cfg["BLOCK_P"], cfg["BLOCK_Q"]
        block_b = max(16, min(1024, triton.next_power_of_2(num_blocks)))
        dw13 = torch.empty(E, two_i, hidden, dtype=w13.dtype, device=device)
        moe_bwd_dw_kernel[(triton.cdiv(hidden, bq), triton.cdiv(two_i, bp), E)](
            dgu, x, dw13, sorted_ids, block_expert, num_blocks, n, two_i, hidden,
            two_i, x.stride(0), dw13.stride(0), dw13.stride(1),
            A_BY_TOKEN=False, B_BY_TOKEN=True, TOP_K=top_k, PRECISION=precision,
            BLOCK_M=bm, BLOCK_P=bp, BLOCK_Q=bq, BLOCK_B=block_b,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        dw2 = torch.empty(E, hidden, inter, dtype=w2.dtype, device=device)
        moe_bwd_dw_kernel[(triton.cdiv(inter, bq), triton.cdiv(hidden, bp), E)](
            dy, hw, dw2, sorted_ids, block_expert, num_blocks, n, hidden, inter,
            dy.stride(0), inter, dw2.stride(0), dw2.stride(1),
            A_BY_TOKEN=True, B_BY_TOKEN=False, TOP_K=top_k, PRECISION=precision,
            BLOCK_M=bm, BLOCK_P=bp, BLOCK_Q=bq, BLOCK_B=block_b,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dx, dw13, dw2, dtw
