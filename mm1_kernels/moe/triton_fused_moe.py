"""Fused MoE experts in Triton: permutation metadata, two grouped GEMMs, a deterministic combine.

Four launches, no host synchronization, every grid sized from shapes alone (so a decode step
can be captured in a CUDA graph):

1. ``moe_align_kernel`` (one program): the N = T·k (token, slot) *entries* are counted per
   expert, each expert's count is padded up to the GEMM row tile ``BLOCK_M``, and the entries
   are written in expert order (ascending entry index within an expert) into ``sorted_ids``,
   whose padding slots hold the sentinel N. ``block_expert[b]`` is the expert of row tile b,
   or -1 for tiles past the padded total. The grid of the GEMMs is the static bound
   ``max_blocks = cdiv(N + min(E, N)·(BLOCK_M-1), BLOCK_M)`` (every non-empty expert wastes
   at most BLOCK_M-1 rows); tiles with expert -1 return before loading anything, so padding
   tiles load no weights, and padding rows inside a tile load no activations. Counting and
   ranking use one-hot compares and a cumulative sum over [entries × experts] in registers:
   no atomics, so the order is deterministic. Expert parallelism: with an ``expert_map``
   (global id → local index, -1 = on another rank; vLLM's convention) ids are mapped *before*
   counting, so entries of experts held elsewhere are never placed, cost no GEMM rows, and E
   (hence the static grid bound) is the local expert count.
2. ``moe_gate_up_kernel``: program (row tile, column tile of I). It gathers its rows of x
   straight from x through ``sorted_ids`` (no permuted copy of x), accumulates the gate
   (w13 rows n) and up (w13 rows I+n) tiles of the same columns side by side in fp32, and
   writes ``silu(gate)·up`` into ``h [max_blocks·BLOCK_M, I]`` in x's dtype — no [T·k, 2I]
   intermediate, no activation kernel.
3. ``moe_down_kernel``: program (row tile, column tile of hidden); ``h @ w2[e]^T`` times the
   entry's routing weight in the epilogue, stored as fp32 row ``entry`` of ``rows [N, hidden]``.
4. ``moe_combine_kernel``: ``y[t] = Σ_j rows[t·k + j]`` in slot order j = 0..k-1, then the cast
   to x's dtype. Fixed order and no atomics: bitwise deterministic. A slot whose expert the map
   places on another rank adds exactly zero (its row was never computed; its weight is never
   read). A token with an out-of-range expert id or map value (possible only when the host
   check was skipped under graph capture or torch.compile) was never placed by step 1, and its
   output row is NaN rather than garbage.

int8 weight-only experts: weights are loaded as int8 (half the bytes of bf16, the point at
small batch), converted to the activation dtype in registers (exact: |q| ≤ 127 fits bf16's
8-bit significand), and the fp32 per-output-channel scale multiplies the fp32 accumulator once
in the epilogue — exact since the scale is constant along the reduction.

Precision: fp32 accumulation everywhere; fp32 inputs use ``input_precision="ieee"`` (no TF32).
``h`` is stored in x's dtype (as the tensor-core operand of GEMM 2 needs), the per-entry rows in
fp32. Offsets that scale with T (x rows, h rows, output rows) and with the expert index (weight
slabs: 32·2·9216·6144 elements pass 2^31) are 64-bit.

Strides: weights are read through their expert and row strides (``w[e, n, k]`` at
``e·stride_we + n·stride_wn + k``), scales through both of theirs, so views of padded or
interleaved buffers (vLLM pads weight rows for alignment) are used in place, never copied.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton_interpret import interpreted_with_fixes


@triton.jit
def local_expert(ids, map_ptr, E, G, HAS_MAP: tl.constexpr):
    """The local expert of each id: in ``[0, E)``, -1 for an expert the map places on another
    rank (contributes zero), -2 for an id or map value out of range (never placed; NaN row).

    Without a map the ids are local already. With one, ids are global, in ``[0, G)``, and
    ``map_ptr[id]`` is the local index or -1. Range tests come before any narrowing cast, so a
    huge int64 id cannot wrap into range."""
    if HAS_MAP:
        known = (ids >= 0) & (ids < G)
        local = tl.load(map_ptr + ids, mask=known, other=-2)
        local = tl.where(known & (local >= -1) & (local < E), local, -2)
    else:
        local = tl.where((ids >= 0) & (ids < E), ids, -2)
    return local.to(tl.int32)


@interpreted_with_fixes
@triton.jit
def moe_align_kernel(ids_ptr, map_ptr, sorted_ids_ptr, block_expert_ptr, N, E, G, max_blocks,
                     HAS_MAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr):
    experts = tl.arange(0, BLOCK_E)
    # Entries per local expert. Non-local (-1) and invalid (-2) entries match no column and are
    # simply never placed: the GEMMs never see them. [E, BLOCK_E) are padding columns.
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for start in range(0, N, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        ids = tl.load(ids_ptr + offs, mask=offs < N, other=-1)
        ids = local_expert(ids, map_ptr, E, G, HAS_MAP)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, axis=0)
    padded_start = padded_end - padded
    total = tl.sum(padded, axis=0)

    # Sentinels in padding slots, expert per row tile. Disjoint from the scatter below (which
    # writes only the real slots), so no barrier is needed between the two.
    for s0 in range(0, max_blocks * BLOCK_M, BLOCK_S):
        slots = s0 + tl.arange(0, BLOCK_S)
        in_real = (slots[:, None] >= padded_start[None, :]) & \
                  (slots[:, None] < (padded_start + counts)[None, :])
        is_real = tl.sum(in_real.to(tl.int32), axis=1) > 0
        tl.store(sorted_ids_ptr + slots, tl.full((BLOCK_S,), 0, tl.int32) + N,
                 mask=(slots < max_blocks * BLOCK_M) & (~is_real))
        # A tile starts at each multiple of BLOCK_M; its expert is the number of experts whose
        # padded range ends at or before it (empty experts end where they start).
        is_tile_start = (slots % BLOCK_M) == 0
        expert_of = tl.sum((padded_end[None, :] <= slots[:, None]).to(tl.int32), axis=1)
        expert_of = tl.where(slots < total, expert_of, -1)
        tl.store(block_expert_ptr + slots // BLOCK_M, expert_of,
                 mask=is_tile_start & (slots < max_blocks * BLOCK_M))

    # Scatter: entry → padded_start[e] + (entries of e before it).
    running = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for start in range(0, N, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        ids = tl.load(ids_ptr + offs, mask=offs < N, other=-1)
        ids = local_expert(ids, map_ptr, E, G, HAS_MAP)
        hit = (ids[:, None] == experts[None, :]).to(tl.int32)
        before = tl.cumsum(hit, axis=0) - hit
        dest = tl.sum(hit * (before + (padded_start + running)[None, :]), axis=1)
        placed = tl.sum(hit, axis=1) > 0
        tl.store(sorted_ids_ptr + dest, offs, mask=placed)
        running += tl.sum(hit, axis=0)


@interpreted_with_fixes
@triton.jit
def moe_gate_up_kernel(x_ptr, w_ptr, scale_ptr, h_ptr, sorted_ids_ptr, block_expert_ptr,
                       N, I, K, stride_xt, stride_we, stride_wn, stride_se, stride_sn,
                       TOP_K: tl.constexpr, QUANT: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    entry = tl.load(sorted_ids_ptr + offs_m)
    row_ok = entry < N
    token = entry // TOP_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + token.to(tl.int64)[:, None] * stride_xt + offs_k[None, :]
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    # [BLOCK_K, BLOCK_N] views of the gate rows n and the up rows I + n of w13[e].
    g_ptrs = w_base + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None]
    u_ptrs = g_ptrs + I * stride_wn  # 2I·hidden per expert stays far below 2^31
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
        u = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
        if QUANT:
            # Through fp32: Triton 3.6's CPU interpreter casts int → bf16 by reinterpreting the
            # bits; on a GPU int8 → bf16 goes through an fp32 convert anyway.
            g = g.to(tl.float32).to(a.dtype)
            u = u.to(tl.float32).to(a.dtype)
        acc_g = tl.dot(a, g, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, u, acc_u, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    if QUANT:
        s_ptrs = scale_ptr + expert.to(tl.int64) * stride_se + offs_n * stride_sn
        acc_g *= tl.load(s_ptrs, mask=n_ok, other=0.0)[None, :]
        acc_u *= tl.load(s_ptrs + I * stride_sn, mask=n_ok, other=0.0)[None, :]
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    h_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * I + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@interpreted_with_fixes
@triton.jit
def moe_down_kernel(h_ptr, w_ptr, scale_ptr, topk_w_ptr, rows_ptr, sorted_ids_ptr,
                    block_expert_ptr, N, H, I, stride_we, stride_wn, stride_se, stride_sn,
                    QUANT: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    entry = tl.load(sorted_ids_ptr + offs_m)
    row_ok = entry < N
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + offs_m.to(tl.int64)[:, None] * I + offs_k[None, :]
    b_ptrs = (w_ptr + expert.to(tl.int64) * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn
              + offs_k[:, None])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k_ok = offs_k < I - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
        if QUANT:
            b = b.to(tl.float32).to(a.dtype)  # through fp32: see moe_gate_up_kernel
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if QUANT:
        acc *= tl.load(scale_ptr + expert.to(tl.int64) * stride_se + offs_n * stride_sn,
                       mask=n_ok, other=0.0)[None, :]
    route_w = tl.load(topk_w_ptr + entry, mask=row_ok, other=0.0)
    acc *= route_w[:, None]
    out_ptrs = rows_ptr + entry.to(tl.int64)[:, None] * H + offs_n[None, :]
    tl.store(out_ptrs, acc, mask=row_ok[:, None] & n_ok[None, :])


@interpreted_with_fixes
@triton.jit
def moe_combine_kernel(rows_ptr, ids_ptr, map_ptr, out_ptr, H, E, G, stride_ot,
                       TOP_K: tl.constexpr, HAS_MAP: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ok = offs < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        e = local_expert(tl.load(ids_ptr + t * TOP_K + j), map_ptr, E, G, HAS_MAP)
        # Only placed entries have a row (an unplaced one is in bounds but unwritten, and the
        # where below drops it): a non-local one (-1) adds exactly zero whatever its weight, an
        # invalid one (-2) NaN.
        r = tl.load(rows_ptr + (t * TOP_K + j) * H + offs, mask=ok, other=0.0)
        acc += tl.where(e >= 0, r, tl.where(e == -1, 0.0, float("nan")))
    tl.store(out_ptr + t * stride_ot + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------
# Tile configurations.
#
# Keyed on the expert width I of one tensor-parallel rank of M1 (hidden 6144: I = 9216 / TP for
# TP 1, 2, 4, 8) and on a bucket of the token count T. Entries: (BLOCK_M, GEMM 1 BLOCK_N,
# BLOCK_K, GEMM 2 BLOCK_N, BLOCK_K, num_warps, num_stages).
#
# Why these shapes: at T ≤ 64 (decode) an expert sees 1-4 rows, so BLOCK_M is the tensor-core
# minimum 16 and the time is the read of the touched experts' weights (2 experts × 3 × 6144 × I
# × 2 bytes at T = 1). That read is only fast when the grid keeps every SM streaming, so the
# column tiles shrink as I shrinks: at T = 1 only 2 experts are active, and GEMM 1 has
# 2 × I / BLOCK_N programs — BLOCK_N = 16 at TP 8 (144 programs for 132 H100 SMs) up to 64 at
# TP 1 (288); GEMM 2 has 2 × 6144 / BLOCK_N. Wide BLOCK_K (128-256) gives long contiguous
# weight reads and few loop trips per program. From T ≈ 17 all 32 experts are touched and the
# grid is already ≥ 32 × I / BLOCK_N, so columns widen. Past 64 tokens the GEMMs become compute
# bound (~T·k/32 rows per expert): BLOCK_M grows to 64/128 to reuse each weight tile over more
# rows, with 128-wide columns and deeper pipelines, as in standard Hopper GEMM tiles.
# These are derived from the arithmetic above, not yet tuned on a GPU (bench/moe.py does that).
TOKEN_BUCKETS = (1, 16, 64, 512, 1 << 62)   # bucket i covers T in (TOKEN_BUCKETS[i-1], TOKEN_BUCKETS[i]]
MOE_CONFIGS = {
    # I:    T ≤ 1                         T ≤ 16                        T ≤ 64
    #       T ≤ 512                       T > 512
    9216: ((16, 64, 128, 64, 128, 4, 4), (16, 64, 128, 64, 128, 4, 4), (16, 64, 128, 128, 128, 4, 4),
           (64, 128, 64, 128, 64, 8, 3), (128, 128, 64, 128, 64, 8, 3)),
    4608: ((16, 32, 256, 64, 128, 4, 4), (16, 32, 256, 64, 128, 4, 4), (16, 64, 128, 128, 128, 4, 4),
           (64, 128, 64, 128, 64, 8, 3), (128, 128, 64, 128, 64, 8, 3)),
    2304: ((16, 32, 256, 32, 256, 4, 4), (16, 32, 256, 32, 256, 4, 4), (16, 64, 128, 64, 128, 4, 4),
           (64, 64, 64, 128, 64, 4, 3), (128, 128, 64, 128, 64, 8, 3)),
    1152: ((16, 16, 256, 32, 256, 4, 4), (16, 16, 256, 32, 256, 4, 4), (16, 32, 256, 64, 128, 4, 4),
           (64, 64, 64, 64, 64, 4, 3), (64, 128, 64, 128, 64, 8, 3)),
}


def moe_config(inter: int, hidden: int, tokens: int):
    """The tile configuration for expert width ``inter`` and ``tokens`` tokens.

    Widths not in the table take the entry of the nearest M1 width; tiles are then clipped to
    the problem (powers of two, ≥ 16 for tl.dot) so tiny test shapes do not pay for empty tiles.
    """
    bucket = next(i for i, hi in enumerate(TOKEN_BUCKETS) if tokens <= hi)
    key = min(MOE_CONFIGS, key=lambda w: abs(w - inter))
    bm, bn1, bk1, bn2, bk2, warps, stages = MOE_CONFIGS[key][bucket]
    p2 = lambda n: max(16, triton.next_power_of_2(n))  # noqa: E731
    return dict(BLOCK_M=bm, BLOCK_N1=min(bn1, p2(inter)), BLOCK_K1=min(bk1, p2(hidden)),
                BLOCK_N2=min(bn2, p2(hidden)), BLOCK_K2=min(bk2, p2(inter)),
                num_warps=warps, num_stages=stages)


# Shared memory a software-pipelined program may use (H100 and H200 allow 227 KiB per block;
# leave room for the epilogue's layout conversions).
SMEM_BUDGET = 160 * 1024


def fit_stages(stages: int, block_m: int, block_n: int, block_k: int, n_weight_tiles: int,
               act_bytes: int, weight_bytes: int) -> int:
    """Pipeline depth that keeps one stage's tiles × stages under ``SMEM_BUDGET``.

    The table is written for bf16 activations and weights; fp32 inputs double every tile, so
    the same tiles run with fewer stages rather than failing to compile.
    """
    per_stage = block_m * block_k * act_bytes + n_weight_tiles * block_k * block_n * weight_bytes
    while stages > 1 and stages * per_stage > SMEM_BUDGET:
        stages -= 1
    return stages


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int,
              expert_map: torch.Tensor | None = None):
    """Permutation metadata for ``topk_ids [T, k]``: ``(sorted_ids, block_expert, max_blocks)``.

    ``sorted_ids`` int32 ``[max_blocks · block_m]`` holds entry indices ``t·k + j`` grouped by
    (local) expert, each group padded to ``block_m`` with the sentinel ``T·k``; ``block_expert``
    int32 ``[max_blocks]`` the local expert of each row tile, -1 past the end. With
    ``expert_map [G]`` (global id → local index, -1 = on another rank) the ids are global and
    are mapped first; entries whose expert is not local are left out. ``max_blocks`` depends
    only on the shapes (``num_experts`` is the local count).
    """
    n = topk_ids.numel()
    max_blocks = triton.cdiv(n + min(num_experts, n) * (block_m - 1), block_m)
    device = topk_ids.device
    sorted_ids = torch.empty(max_blocks * block_m, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=device)
    block_e = max(16, triton.next_power_of_2(num_experts))
    has_map = expert_map is not None
    # Entries × experts one-hot tiles live in registers; the map's gather needs room too
    # (sm_90a, 16 experts: 512-entry tiles take 244-249 registers with a map, 256 take ~125).
    block_n = max(16, min(triton.next_power_of_2(n), max(16, (4096 if has_map else 8192) // block_e)))
    ids = topk_ids.reshape(-1)
    moe_align_kernel[(1,)](ids, expert_map if has_map else ids, sorted_ids, block_expert, n,
                           num_experts, expert_map.shape[0] if has_map else num_experts, max_blocks,
                           HAS_MAP=has_map, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_E=block_e,
                           BLOCK_S=max(16, min(1024, 8192 // block_e)), num_warps=4)
    return sorted_ids, block_expert, max_blocks


def fused_moe_triton(x, w13, w2, topk_weights, topk_ids, w13_scale=None, w2_scale=None,
                     expert_map=None):
    """Launches the four kernels. Weights and scales are read through their strides (only the
    weights' last dimension must be unit stride), so views of padded buffers cost no copy."""
    T, hidden = x.shape
    E, two_i, _ = w13.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    n = T * top_k
    quant = w13.dtype == torch.int8
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 is moot for 16-bit inputs
    cfg = moe_config(inter, hidden, T)
    bm = cfg["BLOCK_M"]
    ids = topk_ids.contiguous()
    route_w = topk_weights.to(torch.float32).contiguous()
    has_map = expert_map is not None
    emap = expert_map.contiguous() if has_map else ids  # [G] ints: tiny
    sorted_ids, block_expert, max_blocks = moe_align(ids, E, bm, emap if has_map else None)

    act_bytes = x.element_size()
    stages1 = fit_stages(cfg["num_stages"], bm, cfg["BLOCK_N1"], cfg["BLOCK_K1"], 2, act_bytes,
                         w13.element_size())
    stages2 = fit_stages(cfg["num_stages"], bm, cfg["BLOCK_N2"], cfg["BLOCK_K2"], 1, act_bytes,
                         w2.element_size())

    h = torch.empty(max_blocks * bm, inter, dtype=x.dtype, device=x.device)
    scale13 = w13_scale if quant else x  # an unused pointer when not quantized
    scale2 = w2_scale if quant else x
    s13_strides = tuple(w13_scale.stride()) if quant else (0, 0)
    s2_strides = tuple(w2_scale.stride()) if quant else (0, 0)
    moe_gate_up_kernel[(max_blocks, triton.cdiv(inter, cfg["BLOCK_N1"]))](
        x, w13, scale13, h, sorted_ids, block_expert, n, inter, hidden,
        x.stride(0), w13.stride(0), w13.stride(1), *s13_strides,
        TOP_K=top_k, QUANT=quant, PRECISION=precision,
        BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N1"], BLOCK_K=cfg["BLOCK_K1"],
        num_warps=cfg["num_warps"], num_stages=stages1)

    rows = torch.empty(n, hidden, dtype=torch.float32, device=x.device)
    moe_down_kernel[(max_blocks, triton.cdiv(hidden, cfg["BLOCK_N2"]))](
        h, w2, scale2, route_w, rows, sorted_ids, block_expert, n, hidden, inter,
        w2.stride(0), w2.stride(1), *s2_strides,
        QUANT=quant, PRECISION=precision,
        BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N2"], BLOCK_K=cfg["BLOCK_K2"],
        num_warps=cfg["num_warps"], num_stages=stages2)

    out = torch.empty(T, hidden, dtype=x.dtype, device=x.device)
    block_h = min(1024, max(16, triton.next_power_of_2(hidden)))
    moe_combine_kernel[(T, triton.cdiv(hidden, block_h))](
        rows, ids, emap, out, hidden, E, emap.shape[0] if has_map else E, out.stride(0),
        TOP_K=top_k, HAS_MAP=has_map, BLOCK_H=block_h, num_warps=4)
    return out
