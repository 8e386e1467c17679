"""Fused MoE experts in Triton: permutation metadata, two grouped GEMMs, a deterministic combine.

Four launches (two for decode), no host synchronization, every grid sized from shapes alone
(so a decode step can be captured in a CUDA graph):

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
2. ``moe_gate_up_kernel``: program (row tile, column tile of I), launched in groups of
   ``GROUP_M`` row tiles × all column tiles, row tile fastest (``grouped_tile``). It gathers its rows of x
   straight from x through ``sorted_ids`` (no permuted copy of x), accumulates the gate
   (w13 rows n) and up (w13 rows I+n) tiles of the same columns side by side in fp32, and
   writes ``silu(gate)·up`` into ``h [max_blocks·BLOCK_M, I]`` in x's dtype — no [T·k, 2I]
   intermediate, no activation kernel.
3. ``moe_down_kernel``: program (row tile, column tile of hidden), same grouped order; ``h @ w2[e]^T`` times the
   entry's routing weight in the epilogue, stored as fp32 row ``entry`` of ``rows [N, hidden]``.
4. ``moe_combine_kernel``: ``y[t] = Σ_j rows[t·k + j]`` in slot order j = 0..k-1, then the cast
   to x's dtype. Fixed order and no atomics: bitwise deterministic. A slot whose expert the map
   places on another rank adds exactly zero (its row was never computed; its weight is never
   read). A token with an out-of-range expert id or map value (possible only when the host
   check was skipped under graph capture or torch.compile) was never placed by step 1, and its
   output row is NaN rather than garbage.

Decode (T·k ≤ ``DIRECT_MAX_ENTRIES``, i.e. T ≤ 8 at top-2): the single-program alignment is a
serial step and the combine a third launch, both pure overhead when a handful of entries
stream a few experts' weights. ``DIRECT`` mode skips them: each entry is its own row tile of
GEMM 1 (its expert read from the routing ids), and ``moe_down_combine_kernel`` computes a
token's k rows of GEMM 2 and sums them in slot order in one program — the combine's exact
arithmetic. Weights are read as in the aligned path (tokens sharing an expert are adjacent in
launch order, so its tiles come from L2 the second time).

Tile shapes are data: ``tile_configs.py`` and ``configs/*.json`` (per device and weight dtype,
written by ``python -m bench.tune_moe``).

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

import functools

import torch
import triton
import triton.language as tl

from .._triton_interpret import interpreted_with_fixes
from .tile_configs import fit_stages, moe_config  # noqa: F401  (re-exported: one table, one home)


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


@triton.jit
def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid`` in the grouped launch order: groups of
    ``GROUP_M`` row tiles × all ``num_n`` column tiles, row tile fastest inside a group. The
    group's activation rows stay in L2 across its column sweep, and a weight column tile is
    read by the group's row tiles of one expert back to back (they are adjacent in launch
    order). The last group may hold fewer row tiles."""
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    in_group = pid % per_group
    return first_m + in_group % rows_in_group, in_group // rows_in_group


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


@triton.jit
def gemm_rows(pid_m, sorted_ids_ptr, block_expert_ptr, ids_ptr, map_ptr, N, E, G,
              DIRECT: tl.constexpr, HAS_MAP: tl.constexpr, BLOCK_M: tl.constexpr):
    """(expert, entries, row_ok, h rows) of row tile ``pid_m``.

    Aligned: the tile's expert and entries come from ``moe_align`` (expert -1 past the end),
    and its ``h`` rows are the tile's padded slots. ``DIRECT`` (decode): row tile = entry
    ``pid_m`` alone, its expert read from the routing ids (local_expert: -1 non-local, -2
    invalid), its ``h`` row the entry itself; the other BLOCK_M - 1 rows are the sentinel N."""
    rows = tl.arange(0, BLOCK_M)
    if DIRECT:
        expert = local_expert(tl.load(ids_ptr + pid_m), map_ptr, E, G, HAS_MAP)
        entry = tl.where(rows == 0, pid_m, N)
        h_rows = entry
    else:
        expert = tl.load(block_expert_ptr + pid_m)
        h_rows = pid_m * BLOCK_M + rows
        entry = tl.load(sorted_ids_ptr + h_rows)
    return expert, entry, entry < N, h_rows


@interpreted_with_fixes
@triton.jit
def moe_gate_up_kernel(x_ptr, w_ptr, scale_ptr, h_ptr, sorted_ids_ptr, block_expert_ptr, ids_ptr, map_ptr,
                       num_m, N, I, K, E, G, stride_xt, stride_we, stride_wn, stride_se, stride_sn,
                       TOP_K: tl.constexpr, QUANT: tl.constexpr, PRECISION: tl.constexpr,
                       DIRECT: tl.constexpr, HAS_MAP: tl.constexpr, GROUP_M: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_m, tl.cdiv(I, BLOCK_N), GROUP_M)
    expert, entry, row_ok, h_rows = gemm_rows(pid_m, sorted_ids_ptr, block_expert_ptr, ids_ptr, map_ptr,
                                              N, E, G, DIRECT, HAS_MAP, BLOCK_M)
    if expert < 0:  # padding tile (aligned) or a non-local / invalid expert (direct): no work
        return
    token = entry // TOP_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + token.to(tl.int64)[:, None] * stride_xt + offs_k[None, :]
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    # [BLOCK_K, BLOCK_N] views of the gate rows n and the up rows I + n of w13[e]: the two
    # BLOCK_M × BLOCK_N accumulators are one BLOCK_M × 2·BLOCK_N output tile.
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
    h_ptrs = h_ptr + h_rows.to(tl.int64)[:, None] * I + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def down_tile(h_ptr, w_ptr, scale_ptr, expert, h_rows, row_ok, offs_n, n_ok, H, I,
              stride_we, stride_wn, stride_se, stride_sn,
              QUANT: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``h[h_rows] @ w2[expert][offs_n]^T`` in fp32 (int8: times the channel scales). One
    function for both down kernels, so a decode token's row is the same arithmetic as a
    prefill entry's."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + h_rows.to(tl.int64)[:, None] * I + offs_k[None, :]
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
    return acc


@interpreted_with_fixes
@triton.jit
def moe_down_kernel(h_ptr, w_ptr, scale_ptr, topk_w_ptr, rows_ptr, sorted_ids_ptr,
                    block_expert_ptr, num_m, N, H, I, stride_we, stride_wn, stride_se, stride_sn,
                    QUANT: tl.constexpr, PRECISION: tl.constexpr, GROUP_M: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_m, tl.cdiv(H, BLOCK_N), GROUP_M)
    expert, entry, row_ok, h_rows = gemm_rows(pid_m, sorted_ids_ptr, block_expert_ptr, sorted_ids_ptr,
                                              sorted_ids_ptr, N, 0, 0, False, False, BLOCK_M)
    if expert < 0:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    acc = down_tile(h_ptr, w_ptr, scale_ptr, expert, h_rows, row_ok, offs_n, n_ok, H, I,
                    stride_we, stride_wn, stride_se, stride_sn, QUANT, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    route_w = tl.load(topk_w_ptr + entry, mask=row_ok, other=0.0)
    acc *= route_w[:, None]
    out_ptrs = rows_ptr + entry.to(tl.int64)[:, None] * H + offs_n[None, :]
    tl.store(out_ptrs, acc, mask=row_ok[:, None] & n_ok[None, :])


@interpreted_with_fixes
@triton.jit
def moe_down_combine_kernel(h_ptr, w_ptr, scale_ptr, topk_w_ptr, ids_ptr, map_ptr, out_ptr, T, H, I, E, G,
                            stride_we, stride_wn, stride_se, stride_sn, stride_ot,
                            TOP_K: tl.constexpr, QUANT: tl.constexpr, PRECISION: tl.constexpr,
                            HAS_MAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr):
    """Decode (``DIRECT``): GEMM 2 and the combine in one launch. Program (token t, column
    tile), token fastest so tokens sharing an expert read its weight tile back to back; the
    token's k entries (h rows t·k + j, one tensor-core row each) are summed in slot order
    j = 0..k-1 exactly as ``moe_combine_kernel`` sums the fp32 rows: same values, same order."""
    pid = tl.program_id(0)
    t = pid % T
    offs_n = (pid // T) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    first_row = tl.arange(0, BLOCK_M) == 0
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        entry = t * TOP_K + j
        e = local_expert(tl.load(ids_ptr + entry), map_ptr, E, G, HAS_MAP)
        placed = e >= 0
        # Masks as full tensors: Triton 3.9's interpreter rejects a tensor & scalar-bool mask.
        rows_placed = first_row & ((tl.zeros((BLOCK_M,), tl.int32) + e) >= 0)
        cols_placed = n_ok & ((tl.zeros((BLOCK_N,), tl.int32) + e) >= 0)
        acc = down_tile(h_ptr, w_ptr, scale_ptr, tl.maximum(e, 0), tl.zeros((BLOCK_M,), tl.int32) + entry,
                        rows_placed, offs_n, cols_placed, H, I,
                        stride_we, stride_wn, stride_se, stride_sn, QUANT, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        row = tl.sum(tl.where(first_row[:, None], acc, 0.0), axis=0) * tl.load(topk_w_ptr + entry)
        # As in the combine: a non-local entry (-1) adds exactly zero, an invalid one (-2) NaN.
        total += tl.where(placed, row, tl.where(e == -1, 0.0, float("nan")))
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + offs_n, total.to(out_ptr.dtype.element_ty), mask=n_ok)


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


# Decode: up to this many (token, slot) entries skip the alignment and the separate combine
# (two launches instead of four): each entry is its own row tile. At M1's top-2 that is T ≤ 8;
# past it, entries of one expert start sharing row tiles and the aligned path wins.
DIRECT_MAX_ENTRIES = 16


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


@functools.cache
def _cuda_device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _device_name(device: torch.device):
    """The name the tile table is keyed on (None off CUDA: the default table)."""
    if device.type != "cuda":
        return None
    return _cuda_device_name(device.index if device.index is not None else torch.cuda.current_device())


def fused_moe_triton(x, w13, w2, topk_weights, topk_ids, w13_scale=None, w2_scale=None,
                     expert_map=None, config=None):
    """Launches the kernels (four; two for decode). Weights and scales are read through their
    strides (only the weights' last dimension must be unit stride), so views of padded buffers
    cost no copy. ``config``: a tile configuration overriding the table (``bench.tune_moe``)."""
    T, hidden = x.shape
    E, two_i, _ = w13.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    n = T * top_k
    quant = w13.dtype == torch.int8
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 is moot for 16-bit inputs
    wname = "int8" if quant else {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(w13.dtype, "bf16")
    cfg = dict(config) if config is not None else moe_config(inter, hidden, T, _device_name(x.device), wname)
    direct = n <= DIRECT_MAX_ENTRIES
    bm = 16 if direct else cfg["BLOCK_M"]  # direct: one entry per tensor-core row tile
    ids = topk_ids.contiguous()
    route_w = topk_weights.to(torch.float32).contiguous()
    has_map = expert_map is not None
    emap = expert_map.contiguous() if has_map else ids  # [G] ints: tiny
    G = emap.shape[0] if has_map else E
    if direct:
        sorted_ids = block_expert = ids  # unused pointers
        num_m = n
        # One group holding every entry (n ≤ DIRECT_MAX_ENTRIES), entry fastest: entries sharing an
        # expert read its weight tile back to back. A constant, so T = 1..8 compile once.
        group_m = DIRECT_MAX_ENTRIES
    else:
        sorted_ids, block_expert, num_m = moe_align(ids, E, bm, emap if has_map else None)
        group_m = cfg["GROUP_M"]

    act_bytes = x.element_size()
    stages1 = fit_stages(cfg["num_stages"], bm, cfg["BLOCK_N1"], cfg["BLOCK_K1"], 2, act_bytes,
                         w13.element_size())
    stages2 = fit_stages(cfg["num_stages"], bm, cfg["BLOCK_N2"], cfg["BLOCK_K2"], 1, act_bytes,
                         w2.element_size())

    h = torch.empty(n if direct else num_m * bm, inter, dtype=x.dtype, device=x.device)
    scale13 = w13_scale if quant else x  # an unused pointer when not quantized
    scale2 = w2_scale if quant else x
    s13_strides = tuple(w13_scale.stride()) if quant else (0, 0)
    s2_strides = tuple(w2_scale.stride()) if quant else (0, 0)
    moe_gate_up_kernel[(num_m * triton.cdiv(inter, cfg["BLOCK_N1"]),)](
        x, w13, scale13, h, sorted_ids, block_expert, ids, emap, num_m, n, inter, hidden, E, G,
        x.stride(0), w13.stride(0), w13.stride(1), *s13_strides,
        TOP_K=top_k, QUANT=quant, PRECISION=precision, DIRECT=direct, HAS_MAP=has_map, GROUP_M=group_m,
        BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N1"], BLOCK_K=cfg["BLOCK_K1"],
        num_warps=cfg["num_warps"], num_stages=stages1)

    out = torch.empty(T, hidden, dtype=x.dtype, device=x.device)
    if direct:
        moe_down_combine_kernel[(T * triton.cdiv(hidden, cfg["BLOCK_N2"]),)](
            h, w2, scale2, route_w, ids, emap, out, T, hidden, inter, E, G,
            w2.stride(0), w2.stride(1), *s2_strides, out.stride(0),
            TOP_K=top_k, QUANT=quant, PRECISION=precision, HAS_MAP=has_map,
            BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N2"], BLOCK_K=cfg["BLOCK_K2"],
            num_warps=cfg["num_warps"], num_stages=stages2)
        return out

    rows = torch.empty(n, hidden, dtype=torch.float32, device=x.device)
    moe_down_kernel[(num_m * triton.cdiv(hidden, cfg["BLOCK_N2"]),)](
        h, w2, scale2, route_w, rows, sorted_ids, block_expert, num_m, n, hidden, inter,
        w2.stride(0), w2.stride(1), *s2_strides,
        QUANT=quant, PRECISION=precision, GROUP_M=group_m,
        BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N2"], BLOCK_K=cfg["BLOCK_K2"],
        num_warps=cfg["num_warps"], num_stages=stages2)

    block_h = min(1024, max(16, triton.next_power_of_2(hidden)))
    moe_combine_kernel[(T, triton.cdiv(hidden, block_h))](
        rows, ids, emap, out, hidden, E, G, out.stride(0),
        TOP_K=top_k, HAS_MAP=has_map, BLOCK_H=block_h, num_warps=4)
    return out
