"""Chunked lightning-attention backward in Triton (docs/m1_math.md §3.5).

Three sweeps, one kernel
------------------------
With ``S_t`` the forward state and ``G_t = ∂L/∂S_t`` the gradient state (``G = λ G_next + q^T do``,
starting from ``dfinal`` at a sequence's end), the gradients are::

    dq_t = do_t S_t^T        dk_t = v_t G_t^T        dv_t = k_t G_t        dinit = λ G_first

Each of the three is a lightning-attention sweep ``out_j = x_j X_j`` with a state
``X ← λ X + y^T z`` (tiled over z's columns, fp32, in registers), run chunk by chunk in the
chunked form of the forward:

=====  =========  ======================  ==========================  ===========
pass   direction  state X                 x, y, z                     out
=====  =========  ======================  ==========================  ===========
dq     forward    S^T  [Dv, D]            do, v, k  (init S_0^T)      dq [T, D]
dk     reverse    G^T  [Dv, D]            v, do, q  (init dfinal^T)   dk [T, D]
dv     reverse    G    [D, Dv]            k, q, do  (init dfinal)     dv [T, Dv]; dinit
=====  =========  ======================  ==========================  ===========

For a block of m tokens (j, i in 0..m-1, ``X`` the state entering the block in sweep order)::

    forward: out_j = λ^(j+1)   x_j X + Σ_{i≤j} λ^(j-i) (x_j·y_i) z_i ;  X ← λ^m X + Σ_i λ^(m-1-i) y_i^T z_i
    reverse: out_j = λ^(m-1-j) x_j X + Σ_{i≥j} λ^(i-j) (x_j·y_i) z_i ;  X ← λ^m X + Σ_i λ^(i+1)   y_i^T z_i

(in the reverse sweep X is the gradient of the state *after* the block, and the last X of a
sequence is ``dinit``). Why three sweeps rather than one program per (block, head) holding both
S and G: dq and dk need the state's value dimension whole (they contract over it) and dv needs
its key dimension whole, so a tiled state serves only one of them without a cross-tile
reduction, which would need atomics or a scratch ``[tiles, T, H, D]``; and storing the forward's
per-block states would cost ``T/64 · H · D · Dv · 4`` bytes (2 GiB at T = 32k, M1 shapes), while
recomputing them costs one state update per block. Nothing is saved by the forward beyond its
inputs. Each sweep multiplies per block and head what the forward does (x y^T, x X, scores z,
the state update: 4C²D + 4CD² FLOPs at D = Dv), so the backward is 3 × the forward; x y^T is
recomputed by each of the 4 z tiles at D = 128, so 1.5 × that is issued (profiles.static).

Long sequences are split across SMs as in the forward (``triton_prefill``): the same planner
and segment table (``choose_segment_len`` / ``build_segments``), a ``local`` pass giving each
segment's own contribution to the state it hands on (from a zero state), a sequential ``scan``
over the segments of each sequence in sweep order (``X ← λ^len X + local``), then the ``output``
pass. Scratch is one fp32 ``[H, D, Dv]`` state per segment (:func:`backward_scratch_bytes`),
shared by the three sweeps (they run one after another) and capped at ``SCRATCH_BYTES``
(1 GiB) by the planner, whatever T. At H = 64, D = Dv = 128 one sequence already has
64 heads × 4 z tiles = 256 programs per sweep, more than the 132 SMs of an H100/H200, so the
planner as it stands does not split: no scratch at T = 128k nor at T = 1M (a sweep is then 256
programs each walking all T/64 chunks). Where it does split (fewer heads per GPU, e.g. H = 8
under tensor parallelism: 32 programs → 4 segments), scratch is (segments + 1 per sequence) ×
H·D·Dv·4 bytes: 5 × 512 KiB = 2.5 MiB at H = 8, for any T. Nothing else is allocated beyond
dq, dk, dv, dinit and the segment table.

Determinism: every output element is written by exactly one program, every sum is in a fixed
order (no atomics), so results are bitwise reproducible. No host synchronization: all sizes are
static (the segment table is built on the device from static bounds, as in the forward).

Precision: as the forward, and with the forward's ``precision`` argument. The states and all
accumulation are fp32; fp32 inputs multiply in full fp32 (``ieee``); bf16 inputs give x·y^T
exactly (bf16 products, fp32 accumulation) and feed every fp32 operand (state, decayed scores,
decayed rows) to the tensor cores rounded to bf16 once (``"default"``: the naive bf16 error,
which storing the gradients in bf16 dominates) or as a bf16 pair hi + lo (``"high"``: ~16
significant bits, twice the products); fp16 inputs are upcast and multiplied in TF32 (exact for
fp16 values).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton_interpret import interpreted_with_fixes
from .triton_prefill import BF16_DOT_MODE, CHUNK, _dot_fp32_lhs, _dot_fp32_rhs, build_segments, choose_segment_len

# _dot_fp32_lhs/_rhs are the forward's products of an fp32 operand with an input-dtype one, per mode.


@triton.jit
def _io_offsets(offs_y, offs_z, DY, DZ, IO_T: tl.constexpr):
    """Offsets of a [BY, BZ] tile of an init/final state [D, Dv] (row-major), seen as [DY, DZ]:
    itself, or transposed (``IO_T``: y runs over Dv, z over D)."""
    if IO_T:
        return offs_z[None, :] * DY + offs_y[:, None]
    return offs_y[:, None] * DZ + offs_z[None, :]


@interpreted_with_fixes
@triton.jit
def lightning_bwd_sweep_kernel(
    x_ptr, y_ptr, z_ptr, out_ptr, slopes_ptr,
    seg_meta_ptr,             # int32 [G, 4]: sequence (-1 = idle program), batch row, t_start, t_end
    seg_state_ptr,            # fp32 [G, H, DY, DZ]: written (LOCAL_PASS) or read (USE_SEG_STATE)
    init_ptr,                 # fp32 [N, H, D, Dv] (HAS_INIT): the state entering each sequence's sweep
    final_ptr,                # fp32 [N, H, D, Dv] (STORE_FINAL): the state leaving it
    sweep_end_ptr,            # int32 [N]: each sequence's segment the sweep ends in
    stride_xb, stride_xt, stride_xh,
    stride_yb, stride_yt, stride_yh,
    stride_zb, stride_zt, stride_zh,
    stride_ob, stride_ot, stride_oh,
    H, DY, DZ,
    C: tl.constexpr, BY: tl.constexpr, BZ: tl.constexpr, REVERSE: tl.constexpr,
    IO_T: tl.constexpr,       # init/final [N, H, D, Dv] seen transposed as [DY, DZ] = [Dv, D]
    LOCAL_PASS: tl.constexpr, USE_SEG_STATE: tl.constexpr,
    HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, DOT_MODE: tl.constexpr,
):
    # One program per (segment, head, z tile) in a 1-D grid, z tile fastest: the z tiles of one
    # (segment, head) read the same x and y chunks and are adjacent in launch order, so they
    # share them in L2 (and a 1-D grid has no 65,535 limit on the number of segments).
    pid = tl.program_id(0)
    nz = tl.cdiv(DZ, BZ)
    iz = pid % nz
    h = (pid // nz) % H
    g = pid // (nz * H)
    seq = tl.load(seg_meta_ptr + g * 4 + 0)
    if seq < 0:
        return
    row = tl.load(seg_meta_ptr + g * 4 + 1).to(tl.int64)
    t_start = tl.load(seg_meta_ptr + g * 4 + 2)
    t_end = tl.load(seg_meta_ptr + g * 4 + 3)
    is_end = tl.load(sweep_end_ptr + seq) == g
    if LOCAL_PASS:
        if is_end:  # the scan never needs the local state of the segment the sweep ends in
            return

    s = tl.load(slopes_ptr + h).to(tl.float32)
    offs_c = tl.arange(0, C)
    offs_y = tl.arange(0, BY)
    offs_z = iz * BZ + tl.arange(0, BZ)
    mask_y = offs_y < DY
    mask_z = offs_z < DZ
    state_mask = mask_y[:, None] & mask_z[None, :]
    # 64-bit scalar bases, 32-bit offsets within one [DY, DZ] state.
    seg_offs = offs_y[:, None] * DZ + offs_z[None, :]
    io_offs = _io_offsets(offs_y, offs_z, DY, DZ, IO_T)
    seq_head_state = (seq.to(tl.int64) * H + h) * DY * DZ
    seg_head_state = (g.to(tl.int64) * H + h) * DY * DZ
    if USE_SEG_STATE:
        X = tl.load(seg_state_ptr + seg_head_state + seg_offs, mask=state_mask, other=0.0)
    elif HAS_INIT:
        X = tl.load(init_ptr + seq_head_state + io_offs, mask=state_mask, other=0.0)
    else:
        X = tl.zeros([BY, BZ], dtype=tl.float32)

    # 64-bit bases (h · stride_h passes 2^31 for head-major views at long T), 32-bit in-chunk offsets.
    x_base = x_ptr + row * stride_xb + h.to(tl.int64) * stride_xh
    y_base = y_ptr + row * stride_yb + h.to(tl.int64) * stride_yh
    z_base = z_ptr + row * stride_zb + h.to(tl.int64) * stride_zh
    o_base = out_ptr + row * stride_ob + h.to(tl.int64) * stride_oh
    x_offs = offs_c[:, None] * stride_xt + offs_y[None, :]
    y_offs = offs_c[:, None] * stride_yt + offs_y[None, :]
    z_offs = offs_c[:, None] * stride_zt + offs_z[None, :]
    o_offs = offs_c[:, None] * stride_ot + offs_z[None, :]
    # Intra-block decays, exponents clamped at 0 where the select zeroes the scores (a select,
    # not a multiply by 0, so a NaN/inf in the *scores'* operands outside the causal range does
    # not leak). The other operand of the block product is dense: a NaN/inf there reaches every
    # row of the 64-token block (0·inf), as in the forward's P·V — documented, not guarded.
    if REVERSE:
        keep = offs_c[:, None] <= offs_c[None, :]                               # i ≥ j
        intra = tl.exp(-s * tl.maximum(offs_c[None, :] - offs_c[:, None], 0).to(tl.float32))
    else:
        keep = offs_c[:, None] >= offs_c[None, :]                               # i ≤ j
        intra = tl.exp(-s * tl.maximum(offs_c[:, None] - offs_c[None, :], 0).to(tl.float32))
    after_j = tl.exp(-s * (offs_c + 1).to(tl.float32))                          # λ^(j+1)

    n_chunks = tl.cdiv(t_end - t_start, C)
    for ci in range(0, n_chunks):
        if REVERSE:
            t0 = t_start + (n_chunks - 1 - ci) * C
        else:
            t0 = t_start + ci * C
        m = tl.minimum(t_end - t0, C)
        row_ok = offs_c < m
        t0_64 = t0.to(tl.int64)
        # Rows past m load as zeros and add nothing; the decays use the true m.
        y = tl.load(y_base + t0_64 * stride_yt + y_offs, mask=row_ok[:, None] & mask_y[None, :], other=0.0)
        z = tl.load(z_base + t0_64 * stride_zt + z_offs, mask=row_ok[:, None] & mask_z[None, :], other=0.0)
        to_end = tl.exp(-s * tl.maximum(m - 1 - offs_c, 0).to(tl.float32))        # λ^(m-1-j)
        if not LOCAL_PASS:
            x = tl.load(x_base + t0_64 * stride_xt + x_offs, mask=row_ok[:, None] & mask_y[None, :], other=0.0)
            if DOT_MODE == "bf16x2" or DOT_MODE == "bf16":  # bf16 products are exact; accumulation fp32
                xy = tl.dot(x, tl.trans(y))
            else:
                xy = tl.dot(x, tl.trans(y), input_precision=DOT_MODE)
            scores = tl.where(keep, xy * intra, 0.0)
            cross = to_end if REVERSE else after_j
            out = _dot_fp32_rhs(x, X, tl.zeros([C, BZ], tl.float32), DOT_MODE) * cross[:, None]
            out = _dot_fp32_lhs(scores, z, out, DOT_MODE)
            tl.store(o_base + t0_64 * stride_ot + o_offs, out.to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & mask_z[None, :])
        upd = after_j if REVERSE else to_end
        yd = tl.trans(y.to(tl.float32) * upd[:, None])
        X = _dot_fp32_lhs(yd, z, X * tl.exp(-s * m.to(tl.float32)), DOT_MODE)

    if LOCAL_PASS:
        tl.store(seg_state_ptr + seg_head_state + seg_offs, X, mask=state_mask)
    elif STORE_FINAL:
        if is_end:
            tl.store(final_ptr + seq_head_state + io_offs, X, mask=state_mask)


@interpreted_with_fixes
@triton.jit
def lightning_bwd_scan_kernel(
    slopes_ptr, seg_meta_ptr, seg_state_ptr, init_ptr, sweep_start_ptr, sweep_end_ptr,
    H, DY, DZ,
    BY: tl.constexpr, BZ: tl.constexpr, HAS_INIT: tl.constexpr, IO_T: tl.constexpr,
):
    """Replace each segment's local state by the state entering it, walking each sequence's
    segments in sweep order (forward: increasing, reverse: decreasing index)."""
    n = tl.program_id(0)
    h = tl.program_id(1)
    iz = tl.program_id(2)
    start = tl.load(sweep_start_ptr + n)
    end = tl.load(sweep_end_ptr + n)
    step = tl.where(end >= start, 1, -1)
    s = tl.load(slopes_ptr + h).to(tl.float32)
    offs_y = tl.arange(0, BY)
    offs_z = iz * BZ + tl.arange(0, BZ)
    state_mask = (offs_y < DY)[:, None] & (offs_z < DZ)[None, :]
    seg_offs = offs_y[:, None] * DZ + offs_z[None, :]
    per_segment = tl.full([], H * DY * DZ, tl.int64)
    head = h * DY * DZ
    if HAS_INIT:
        X = tl.load(init_ptr + n.to(tl.int64) * per_segment + head + _io_offsets(offs_y, offs_z, DY, DZ, IO_T),
                    mask=state_mask, other=0.0)
    else:
        X = tl.zeros([BY, BZ], dtype=tl.float32)
    for i in range(0, tl.abs(end - start)):
        g = start + i * step
        ptrs = seg_state_ptr + g * per_segment + head + seg_offs
        local = tl.load(ptrs, mask=state_mask, other=0.0)
        tl.store(ptrs, X, mask=state_mask)
        length = tl.load(seg_meta_ptr + g * 4 + 3) - tl.load(seg_meta_ptr + g * 4 + 2)
        X = X * tl.exp(-s * length.to(tl.float32)) + local
    tl.store(seg_state_ptr + end * per_segment + head + seg_offs, X, mask=state_mask)


# Every product of the sweep has 64 rows (one chunk) but the state update (BY rows): with 8 warps
# Triton lays the 64-row ones out as warpsPerCTA = [8, 1] and both warp groups issue all of them.
# With 4 warps nothing is duplicated, and 2 CTAs fit an SM (108 KiB shared each), so the same 8
# warps per SM run. sm_90a, D = 128, BZ = 32, bf16 (tests/test_lightning_backward.py compiles
# these): precision "default" 255 registers, 0 B/thread of spills (Triton 3.6; 0-4 B with 3.9);
# with dinit wanted (the state stored after the loop) 68-80 B; "high" with dinit 108-124 B. With
# 8 warps: 206-213 registers and the duplicated products. Which is faster is for a GPU to say.
NUM_WARPS = 4


def _z_tile(dz: int) -> int:
    # As the forward's value tile: 32 wide past 64 (fewer registers, more programs).
    return max(16, min(32 if dz > 64 else 64, triton.next_power_of_2(dz)))


def _sequence_bounds(B, T, cu_seqlens, device):
    """(N, bos, eos, batch row) per sequence, on the device."""
    if cu_seqlens is None:
        bos = torch.zeros(B, dtype=torch.int64, device=device)
        eos = torch.full((B,), T, dtype=torch.int64, device=device)
        return B, bos, eos, torch.arange(B, dtype=torch.int64, device=device)
    n = cu_seqlens.numel() - 1
    cu = cu_seqlens.to(torch.int64).clamp(0, T)
    return n, cu[:-1], torch.maximum(cu[1:], cu[:-1]), torch.zeros(n, dtype=torch.int64, device=device)


def plan_segments(total_tokens: int, num_seqs: int, H: int, D: int, DV: int, device) -> int | None:
    """The backward's segment length (None: one segment per sequence), from the forward's planner
    with the z-tile count of the widest sweep."""
    nz = max(triton.cdiv(D, _z_tile(D)), triton.cdiv(DV, _z_tile(DV)))
    return choose_segment_len(total_tokens, num_seqs, H, nz, H * D * DV * 4, device)


def backward_scratch_bytes(total_tokens: int, num_seqs: int, H: int, D: int, DV: int, device) -> int:
    """Bytes of segment-state scratch :func:`lightning_backward_triton` allocates (0 unsplit)."""
    seg = plan_segments(total_tokens, num_seqs, H, D, DV, device)
    return 0 if seg is None else (triton.cdiv(total_tokens, seg) + num_seqs) * H * D * DV * 4


def lightning_backward_triton(do, dfinal, q, k, v, slopes, initial_state, cu_seqlens, need_dinit=True,
                              segment_len: int | None = None, precision: str = "default"):
    """Gradients of the prefill on validated inputs: ``(dq, dk, dv, dinit)``.

    ``do [B, T, H, Dv]`` in q's dtype (last dim contiguous); ``dfinal`` fp32 contiguous
    ``[N, H, D, Dv]`` or None (no gradient through the final states); ``dinit`` fp32
    ``[N, H, D, Dv]``, or None unless ``need_dinit``. ``segment_len`` (a multiple of 64) forces
    the split into segments; by default it is chosen from the sizes and the SM count.
    ``precision`` ("default" / "high") is the forward's: how bf16 inputs meet the fp32 operands.
    """
    B, T, H, D = q.shape
    DV = v.shape[-1]
    device = q.device
    N, bos, eos, rows = _sequence_bounds(B, T, cu_seqlens, device)
    total = B * T if cu_seqlens is None else T
    if segment_len is None:
        segment_len = plan_segments(total, N, H, D, DV, device)
    elif segment_len % CHUNK or segment_len <= 0:
        raise ValueError(f"segment_len must be a positive multiple of {CHUNK}, got {segment_len}")
    meta, first, last = build_segments(bos, eos, rows, total, segment_len)
    G = meta.shape[0]
    dq = torch.empty(B, T, H, D, dtype=q.dtype, device=device)
    dk = torch.empty(B, T, H, D, dtype=k.dtype, device=device)
    dv = torch.empty(B, T, H, DV, dtype=v.dtype, device=device)
    dinit = torch.empty(N, H, D, DV, dtype=torch.float32, device=device) if need_dinit else None
    dummy = torch.empty(1, dtype=torch.float32, device=device)
    seg_state = (torch.empty(G, H, D, DV, dtype=torch.float32, device=device) if segment_len is not None
                 else dummy)
    dot_mode = {torch.float32: "ieee", torch.float16: "tf32"}.get(q.dtype) or BF16_DOT_MODE[precision]

    def sweep(x, y, z, out, reverse, init, final, transposed):
        DY, DZ = y.shape[-1], z.shape[-1]
        BY, BZ = max(16, triton.next_power_of_2(DY)), _z_tile(DZ)
        nz = triton.cdiv(DZ, BZ)
        grid = (G * H * nz,)
        # init/final are [N, H, D, Dv]; the dq and dk sweeps see them as [Dv, D].
        start, end = (last, first) if reverse else (first, last)
        strides = (*x.stride()[:3], *y.stride()[:3], *z.stride()[:3], *out.stride()[:3], H, DY, DZ)
        common = dict(C=CHUNK, BY=BY, BZ=BZ, REVERSE=reverse, IO_T=transposed, DOT_MODE=dot_mode,
                      num_warps=NUM_WARPS)
        has_init = init is not None
        init = init if has_init else dummy
        if segment_len is None:
            lightning_bwd_sweep_kernel[grid](
                x, y, z, out, slopes, meta, dummy, init, final if final is not None else dummy, end, *strides,
                LOCAL_PASS=False, USE_SEG_STATE=False, HAS_INIT=has_init, STORE_FINAL=final is not None,
                **common)
            return
        lightning_bwd_sweep_kernel[grid](
            x, y, z, out, slopes, meta, seg_state, dummy, dummy, end, *strides,
            LOCAL_PASS=True, USE_SEG_STATE=False, HAS_INIT=False, STORE_FINAL=False, **common)
        lightning_bwd_scan_kernel[(N, H, nz)](
            slopes, meta, seg_state, init, start, end, H, DY, DZ,
            BY=BY, BZ=BZ, HAS_INIT=has_init, IO_T=transposed, num_warps=4)
        lightning_bwd_sweep_kernel[grid](
            x, y, z, out, slopes, meta, seg_state, dummy, final if final is not None else dummy, end, *strides,
            LOCAL_PASS=False, USE_SEG_STATE=True, HAS_INIT=False, STORE_FINAL=final is not None, **common)

    sweep(do, v, k, dq, False, initial_state, None, transposed=True)
    sweep(v, do, q, dk, True, dfinal, None, transposed=True)
    sweep(k, q, do, dv, True, dfinal, dinit, transposed=False)
    return dq, dk, dv, dinit
