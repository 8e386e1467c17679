"""Chunked lightning-attention prefill in Triton.

Work decomposition
------------------
Every sequence is cut into *segments* of ``segment_len`` tokens (a multiple of the chunk
size C = 64); one program owns one (segment, head, value tile) and walks the segment's chunks
in order, keeping its slice of the fp32 state in registers. For bf16 at D ≤ 128 the value tile
is all of Dv, so a program reads each chunk's q, k, v once and writes o once, and Q K^T is
computed once per chunk and head. Per chunk, with the state held transposed (S^T, value rows)::

    P^T   = (K Q^T) ∘ M^T                      M[j, i] = λ^(j-i) for key i ≤ query j, else 0
    o^T   = S^T Q^T diag(λ^(j+1)) + V^T P^T
    S^T  ← λ^m S^T + (diag(λ^(m-1-i)) V)^T K

Tensor-core shapes (sm_90a, D = Dv = 128, 8 warps = two warp groups): the three products with
the value tile as rows (o^T twice, S^T) have 128 rows, 64 per warp group, so nothing is computed
twice; K Q^T has 64 rows and the warp groups split its columns (``warpsPerCTA = [4, 2]``; the
kernel keeps Triton from choosing ``[8, 1]``, which would repeat it in both warp groups, see
the comment at the product). All of it is wgmma (HGMMA) fed by cp.async; 250-255 registers,
no spills (``"high"`` precision: 24-76 B/thread, values parked across the loop), 144 KiB of
shared memory: one program per SM. ``python -m profiles.static`` reads the
compiled kernel and ``tests/test_triton_aot.py`` holds these properties.

Launch order: a 1-D grid, value tile fastest, then head, then segment, so value tiles that
share q and k (D > 128, fp16, fp32) run side by side and read them from HBM once.

When the (sequence, head, value tile) programs fill more than half the SMs, this is a single
kernel. Otherwise a long sequence is split into the most segments that keep the programs within
one wave of one per SM (``choose_segment_len``; 2 for one sequence at H = 64, 16 at the 8 heads
one GPU holds under TP = 8: 128 programs on an H100's 132 SMs), and three kernels run:

1. ``local state``: each non-last segment's own contribution, started from a zero state;
2. ``scan``: per (sequence, head, 32 value columns), a sequential pass over segment boundaries
   that turns local states into each segment's incoming state (``S ← λ^L S + local``),
   starting from ``initial_state``;
3. ``output``: every segment again, from its incoming state, writing ``o`` (and the final state
   from each sequence's last segment).

The price of splitting is that the non-last segments' K^T V is computed, and their k and v read,
twice (passes 1 and 3); nothing is recomputed when not split. At H = 64 and one sequence that is
5/3 of the counted tensor work instead of 4/3 and 1.26× the minimum HBM bytes instead of 1.00×;
at H = 8 with 16 segments, 1.96× and 1.47× (``python -m profiles.static``).

Scratch memory is one fp32 ``[H, D, Dv]`` state per segment (the table ``seg_meta`` has ⌈T/L⌉ + N
rows), nothing per chunk, capped at ``SCRATCH_BYTES`` (1 GiB). One 1,048,576-token sequence at
H = 64, D = 128 runs in one call with 2 segments (3 table rows, 12 MiB of scratch); at H = 8
with 16 segments (17 rows, 8.5 MiB).

Slot-indexed state cache (``state_cache`` / ``slot_ids``, a serving engine's chunked prefill):
``HAS_SLOTS`` makes ``init_state_ptr`` the cache ``[S, H, D, D]`` and indexes it through
``slot_ids[seq]`` in place: the single pass reads the slot at its start and writes it at its end;
when split, the scan reads the slot and the sequence's last segment (output pass) writes it, so
no program reads a slot another program of the same launch writes. A negative slot (padding)
skips all work: zero outputs, cache untouched. An out-of-range slot (host check skipped under
graph capture) gives NaN outputs and leaves the cache untouched.

Consistent mode (``BOUNDARY_STATE``, docs/m1_math.md §3.6): never split, and the state stops at
each sequence's last chunk boundary (a trailing partial chunk does not advance it; a slot is
written back only when a chunk completed), which ``lightning_chunk_cache_step`` keeps.

Tile bases and state offsets are 64-bit (one 64-bit scalar base per chunk and tensor, 32-bit
offsets inside the chunk), since ``T·H·D`` passes 2^31 at one million tokens. Decay exponents
are never negative, so nothing overflows; ``λ^m`` underflows to 0 for fast heads, which is the
correct value.

Precision (``precision=``, public in ``lightning_attention``)
-------------------------------------------------------------
The state and every accumulation are fp32 in every mode. bf16 inputs: K Q^T takes the inputs as
they are (exact products, fp32 accumulation). The state update's decayed values always enter
as a bf16 pair hi + lo (two products): rounding them once would put ~1e-3 of error into the
fp32 state, whose contract is 1e-5. The other two fp32 operands (the state in Q S, the decayed
scores in P V) depend on the mode:

- ``"default"``: rounded to bf16 once (one product each), as a plain bf16 tensor-core kernel
  does: within 2× the naive bf16 error (tests/test_lightning.py checks it against fp64). Tensor
  work issued is 4/3 of the count (4C²D + 4CD² FLOPs per chunk and head): the second product
  of the state update.
- ``"high"``: each split into a bf16 pair (~16 significant bits, two products each): 11/6 of
  the count. A pair, not TF32, because it keeps 16 bits where TF32 keeps 11, for the same
  tensor-core time (TF32 runs at half the bf16 rate).

Measured through the CPU interpreter against the fp64 recurrence at H=2, D=128, T=257 (one
segment): bf16 o 1.72e-3 relative error ("default"), 1.66e-3 ("high"), naive bf16 1.73e-3; the
final state 1.2e-6 in both. The gap depends on the inputs: with M1's layer-0 slopes (slow
decay) and a random initial state, 2.35e-3 ("default"), 1.68e-3 ("high"), naive 2.65e-3, so
"default" can be ~1.4× "high" while staying under the naive error. Storing o in bf16 bounds
both from below; "high" is for per-element accuracy beyond a plain bf16 kernel's. fp32 inputs: every product in
full fp32 (``input_precision="ieee"``, no TF32), whatever ``precision`` says. fp16 inputs cannot
use the pair (a state above 65504 would overflow), so they are upcast and multiplied in TF32,
exact for fp16 values, whatever ``precision`` says.

Plain pointers, not tensor descriptors (TMA): device-side descriptors need a global allocator
hook (``triton.set_allocator``) and their 16-byte stride and base alignment rules exclude
strided views such as a fused qkv tensor with odd D.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._triton_interpret import interpreted_with_fixes
from .api import check_precision

CHUNK = 64
SCRATCH_BYTES = 1 << 30
# Resident prefill programs per SM the split into segments aims for: at M1's D = 128 one
# program is 8 warps holding the whole fp32 state, one per SM (registers).
PROGRAMS_PER_SM = 1
MIN_SEGMENT_CHUNKS = 4
SCAN_BV = 32                  # value columns per scan program (elementwise: any tile works)
# User-facing precision names -> the kernel's product mode for bf16 inputs (see the docstring).
BF16_DOT_MODE = {"default": "bf16", "high": "bf16x2"}


@triton.jit
def _dot_fp32_lhs(a32, b16, acc, MODE: tl.constexpr):
    """acc + a32 @ b for an fp32 ``a32`` and an input-dtype ``b16`` (see the module docstring)."""
    if MODE == "bf16x2":      # a as a bf16 pair hi + lo: ~16 significant bits, two products
        a_hi = a32.to(b16.dtype)
        acc = tl.dot(a_hi, b16, acc)
        acc = tl.dot((a32 - a_hi.to(tl.float32)).to(b16.dtype), b16, acc)
    elif MODE == "bf16":      # a rounded to bf16 once: one product
        acc = tl.dot(a32.to(b16.dtype), b16, acc)
    else:                     # "ieee" (fp32 inputs) or "tf32" (fp16 inputs, exact in TF32)
        acc = tl.dot(a32, b16.to(tl.float32), acc, input_precision=MODE)
    return acc


@triton.jit
def _dot_fp32_rhs(a16, b32, acc, MODE: tl.constexpr):
    """acc + a @ b32 for an input-dtype ``a16`` and an fp32 ``b32``."""
    if MODE == "bf16x2":
        b_hi = b32.to(a16.dtype)
        acc = tl.dot(a16, b_hi, acc)
        acc = tl.dot(a16, (b32 - b_hi.to(tl.float32)).to(a16.dtype), acc)
    elif MODE == "bf16":
        acc = tl.dot(a16, b32.to(a16.dtype), acc)
    else:
        acc = tl.dot(a16.to(tl.float32), b32, acc, input_precision=MODE)
    return acc


@triton.jit
def _state_update(S, k, v, s, m, offs_c, C: tl.constexpr, DOT_MODE: tl.constexpr, BOUNDARY_STATE: tl.constexpr):
    """S^T after a chunk of m tokens (rows of k, v past m loaded as zeros)."""
    v_decay = tl.exp(-s * tl.maximum(m - 1 - offs_c, 0).to(tl.float32))
    e = m
    if BOUNDARY_STATE:
        # A partial chunk (m < C) leaves S as it was: S · λ^0 + Σ 0 · k is S exactly (λ^0 is
        # exactly 1, the products are zeros, no flush to zero in these kernels). Skipping the
        # update behind a branch instead measured 188 B of spills (sm_90a, bf16); this none.
        v_decay = tl.where(m == C, v_decay, 0.0)
        e = tl.where(m == C, m, 0)
    vd = tl.trans(v.to(tl.float32) * v_decay[:, None])
    return _dot_fp32_lhs(vd, k, S * tl.exp(-s * e.to(tl.float32)),
                         "bf16x2" if DOT_MODE == "bf16" else DOT_MODE)


@interpreted_with_fixes
@triton.jit
def lightning_segment_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, slopes_ptr,
    seg_meta_ptr,             # int32 [G, 4]: sequence (-1 = idle program), batch row, t_start, t_end
    seg_state_ptr,            # fp32 [G, H, D, D]: written (LOCAL_PASS) or read (USE_SEG_STATE)
    init_state_ptr,           # fp32 [N, H, D, D] (HAS_INIT); with HAS_SLOTS the state cache [S, H, D, D]
    final_state_ptr,          # fp32 [N, H, D, D] (STORE_FINAL), indexed by sequence
    seq_last_seg_ptr,         # int32 [N]: index of each sequence's last segment
    slot_ptr,                 # int32/int64 [N] (HAS_SLOTS): each sequence's slot in the cache, < 0 = padding
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    H, D, DV, num_slots,
    C: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    LOCAL_PASS: tl.constexpr, USE_SEG_STATE: tl.constexpr,
    HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr, HAS_SLOTS: tl.constexpr,
    DOT_MODE: tl.constexpr, EXACT_TILES: tl.constexpr, BOUNDARY_STATE: tl.constexpr,
):
    # One program per (segment, head, value tile), value tile fastest: the value tiles of one
    # (segment, head) share q and k and are adjacent in launch order (one 1-D grid: no 65,535
    # limit on the number of segments).
    pid = tl.program_id(0)
    nv = tl.cdiv(DV, BV)
    iv = pid % nv
    h = (pid // nv) % H
    g = pid // (nv * H)
    seq = tl.load(seg_meta_ptr + g * 4 + 0)
    if seq < 0:
        return
    row = tl.load(seg_meta_ptr + g * 4 + 1).to(tl.int64)
    t_start = tl.load(seg_meta_ptr + g * 4 + 2)
    t_end = tl.load(seg_meta_ptr + g * 4 + 3)
    is_last = tl.load(seq_last_seg_ptr + seq) == g
    if LOCAL_PASS:
        if is_last:  # the scan never needs the last segment's local state
            return

    s = tl.load(slopes_ptr + h).to(tl.float32)
    offs_c = tl.arange(0, C)
    offs_d = tl.arange(0, BD)
    offs_v = iv * BV + tl.arange(0, BV)
    if EXACT_TILES:
        # D == BD and the value tiles cover Dv exactly (M1): constant masks fold away. Masks
        # on a runtime D would cost a predicate per element of every tile, held in registers.
        mask_v = tl.full([BV], 1, tl.int1)
        mask_d = tl.full([BD], 1, tl.int1)
    else:
        mask_v = offs_v < DV
        mask_d = offs_d < D
    # The state is held transposed, S^T [BV, BD] (value rows, key columns), so that every
    # product with a value-sized side has the value tile (128 at M1) as its row dimension; see
    # the module docstring. 64-bit scalar bases, 32-bit offsets within one [D, DV] state.
    final_head_state = (seq.to(tl.int64) * H + h) * D * DV
    if HAS_SLOTS:
        # Slot-indexed cache: the initial state is read from, and the final state written back
        # to, slot_ids[seq] of init_state_ptr (in place). A padding sequence (slot < 0) neither
        # reads nor writes the cache and gets zero outputs; an out-of-range slot (reachable only
        # when the host check was skipped, e.g. during graph capture) gets NaN outputs and
        # leaves the cache untouched.
        slot = tl.load(slot_ptr + seq).to(tl.int64)
        if (slot < 0) | (slot >= num_slots):
            if not LOCAL_PASS:
                fill = tl.where(slot < 0, 0.0, float("nan"))
                o_fill = (tl.zeros([C, BV], dtype=tl.float32) + fill).to(o_ptr.dtype.element_ty)
                o_pad = o_ptr + row * stride_ob + h.to(tl.int64) * stride_oh + t_start.to(tl.int64) * stride_ot
                o_pad_offs = offs_c[:, None] * stride_ot + offs_v[None, :]
                for t0 in range(t_start, t_end, C):
                    tl.store(o_pad + o_pad_offs, o_fill, mask=(offs_c < t_end - t0)[:, None] & mask_v[None, :])
                    o_pad += C * stride_ot
                if STORE_FINAL:
                    if is_last:
                        tl.store(final_state_ptr + final_head_state + offs_d[:, None] * DV + offs_v[None, :],
                                 tl.zeros([BD, BV], dtype=tl.float32) + fill,
                                 mask=mask_d[:, None] & mask_v[None, :])
            return
        head_state = (slot * H + h) * D * DV
    else:
        head_state = final_head_state

    # The incoming state is read as [BD, BV] and transposed, so its offsets and mask are other
    # values than the [BV, BD] ones the stores after the loop compute (the compiler would merge
    # equal ones and keep them live, 64 registers each, across the whole loop).
    in_offs = offs_d[:, None] * DV + offs_v[None, :]
    in_mask = mask_d[:, None] & mask_v[None, :]
    if USE_SEG_STATE:
        S = tl.trans(tl.load(seg_state_ptr + (g.to(tl.int64) * H + h) * D * DV + in_offs, mask=in_mask,
                             other=0.0))
    elif HAS_INIT:
        S = tl.trans(tl.load(init_state_ptr + head_state + in_offs, mask=in_mask, other=0.0))
    else:
        S = tl.zeros([BV, BD], dtype=tl.float32)

    # Bases are 64-bit products: a head stride can itself reach 2^27 (a head-major
    # [B, H, T, D] view at T = 1M), so h · stride_h overflows int32 for most heads.
    # Plain pointers, not block pointers (removed in Triton 3.9) and not tensor descriptors
    # (device-side descriptors need a global allocator hook, and their 16-byte stride and base
    # alignment rules exclude strided views such as a fused qkv tensor with odd D). Each chunk
    # has one 64-bit scalar base per tensor, advanced by C rows per step; offsets within a
    # chunk are 32-bit (C · stride_t stays far below 2^31), so no per-element 64-bit address is
    # built (that spilled ~1 KB). Rows past t_end and columns past D load as zeros.
    q_rows = q_ptr + row * stride_qb + h.to(tl.int64) * stride_qh + t_start.to(tl.int64) * stride_qt
    k_rows = k_ptr + row * stride_kb + h.to(tl.int64) * stride_kh + t_start.to(tl.int64) * stride_kt
    v_rows = v_ptr + row * stride_vb + h.to(tl.int64) * stride_vh + t_start.to(tl.int64) * stride_vt
    o_rows = o_ptr + row * stride_ob + h.to(tl.int64) * stride_oh + t_start.to(tl.int64) * stride_ot
    q_offs = offs_c[:, None] * stride_qt + offs_d[None, :]
    k_offs = offs_c[:, None] * stride_kt + offs_d[None, :]
    v_offs = offs_c[:, None] * stride_vt + offs_v[None, :]
    o_offs = offs_v[:, None] + offs_c[None, :] * stride_ot          # o^T tile [BV, C]

    for t0 in range(t_start, t_end, C):
        m = tl.minimum(t_end - t0, C)
        row_ok = offs_c < m
        k = tl.load(k_rows + k_offs, mask=row_ok[:, None] & mask_d[None, :], other=0.0)
        v = tl.load(v_rows + v_offs, mask=row_ok[:, None] & mask_v[None, :], other=0.0)
        if not LOCAL_PASS:
            q = tl.load(q_rows + q_offs, mask=row_ok[:, None] & mask_d[None, :], other=0.0)
            # o^T = S^T Q^T λ^(j+1) + V^T P^T, both with the value tile as rows.
            # (decay vectors and masks are recomputed per chunk, not held across the loop)
            q_decay = tl.exp(-s * (offs_c + 1).to(tl.float32))
            ot = _dot_fp32_lhs(S, tl.trans(q), tl.zeros([BV, C], tl.float32), DOT_MODE) * q_decay[None, :]
            # K Q^T inside a branch that is always taken: Triton lays a product whose result
            # feeds another product in the same block out as warpsPerCTA = [num_warps, 1], and
            # at 64 rows with 8 warps both warp groups would then compute all of it; from inside
            # the branch its result feeds no product and the warp groups split its columns.
            if m > 0:
                pt = tl.dot(k, tl.trans(q), input_precision="ieee" if DOT_MODE == "ieee" else "tf32")
            else:
                pt = tl.zeros([C, C], dtype=tl.float32)
            # Scores are held transposed too, P^T[i, j] = k_i · q_j for key i ≤ query j, decayed
            # by λ^(j-i); the exponent is clamped at 0 below the diagonal, where the select zeroes
            # the scores (a select, not a multiply: a NaN or inf in a later token's k must not
            # reach an earlier token's output through 0 · NaN). The decay mask is recomputed per
            # chunk (16 exp per thread) rather than held in registers across the loop.
            intra_decay = tl.exp(-s * tl.maximum(offs_c[None, :] - offs_c[:, None], 0).to(tl.float32))
            pt = tl.where(offs_c[:, None] <= offs_c[None, :], pt * intra_decay, 0.0)
            ot = _dot_fp32_rhs(tl.trans(v), pt, ot, DOT_MODE)
            tl.store(o_rows + o_offs, ot.to(o_ptr.dtype.element_ty), mask=mask_v[:, None] & row_ok[None, :])
            q_rows += C * stride_qt
            o_rows += C * stride_ot
        # S^T ← λ^m S^T + (diag(λ^(m-1-i)) V)^T K. Rows past m were loaded as zeros, so they
        # add nothing; the decay uses the true m. The decayed values enter as a bf16 pair in both
        # bf16 modes: the state is fp32 by contract (1e-5), and one bf16 rounding of them would
        # cost ~1e-3 of it. Decaying V (an A operand, from registers) rather than K (a B
        # operand, through shared memory) measured fewer registers.
        S = _state_update(S, k, v, s, m, offs_c, C, DOT_MODE, BOUNDARY_STATE)
        k_rows += C * stride_kt
        v_rows += C * stride_vt

    # After the loop, the state's addresses are rebuilt from the segment table rather than kept
    # live through it: the output pass sits at the register limit, and values parked across the
    # loop are what ptxas spills first.
    seq_end = tl.load(seg_meta_ptr + g * 4 + 0).to(tl.int64)
    out_offs = offs_d[None, :] * DV + offs_v[:, None]
    out_mask = mask_v[:, None] & mask_d[None, :]
    if LOCAL_PASS:
        tl.store(seg_state_ptr + (g.to(tl.int64) * H + h) * D * DV + out_offs, S, mask=out_mask)
    else:
        if tl.load(seq_last_seg_ptr + seq_end) == g:
            if STORE_FINAL:
                tl.store(final_state_ptr + (seq_end * H + h) * D * DV + out_offs, S, mask=out_mask)
            if HAS_SLOTS:  # back into the sequence's slot, in place
                slot_end = tl.load(slot_ptr + seq_end).to(tl.int64)
                if BOUNDARY_STATE:
                    # A call that completes no chunk (most decode steps) leaves the boundary
                    # state as it was: skip its write (H·D·Dv·4 bytes per slot).
                    span = tl.load(seg_meta_ptr + g * 4 + 3) - tl.load(seg_meta_ptr + g * 4 + 2)
                    out_mask = out_mask & (span >= C)
                tl.store(init_state_ptr + (slot_end * H + h) * D * DV + out_offs, S, mask=out_mask)


@interpreted_with_fixes
@triton.jit
def lightning_segment_scan_kernel(
    slopes_ptr, seg_state_ptr, init_state_ptr, seq_first_seg_ptr, seq_last_seg_ptr, slot_ptr,
    H, D, DV, segment_len, num_slots,
    BD: tl.constexpr, BV: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SLOTS: tl.constexpr,
):
    """Replace each segment's local state by its incoming state, sequence by sequence.

    With HAS_SLOTS the initial state is ``init_state_ptr[slot_ptr[n]]`` (the state cache); a
    padding (negative) or out-of-range slot skips the sequence, whose output pass writes fills.
    """
    n = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    if HAS_SLOTS:
        init_row = tl.load(slot_ptr + n).to(tl.int64)
        if (init_row < 0) | (init_row >= num_slots):
            return
    else:
        init_row = n.to(tl.int64)
    first = tl.load(seq_first_seg_ptr + n)
    last = tl.load(seq_last_seg_ptr + n)
    s = tl.load(slopes_ptr + h).to(tl.float32)
    # Every segment but a sequence's last holds exactly segment_len tokens.
    seg_decay = tl.exp(-s * segment_len.to(tl.float32))
    offs_d = tl.arange(0, BD)
    offs_v = iv * BV + tl.arange(0, BV)
    state_mask = (offs_d < D)[:, None] & (offs_v < DV)[None, :]
    state_offs = offs_d[:, None] * DV + offs_v[None, :]
    per_segment = tl.full([], H * D * DV, tl.int64)
    head_offs = h * D * DV + state_offs
    if HAS_INIT:
        S = tl.load(init_state_ptr + init_row * per_segment + head_offs, mask=state_mask, other=0.0)
    else:
        S = tl.zeros([BD, BV], dtype=tl.float32)
    for g in range(first, last):
        ptrs = seg_state_ptr + g * per_segment + head_offs
        local = tl.load(ptrs, mask=state_mask, other=0.0)
        tl.store(ptrs, S, mask=state_mask)
        S = S * seg_decay + local
    tl.store(seg_state_ptr + last * per_segment + head_offs, S, mask=state_mask)


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 1


def choose_segment_len(total_tokens: int, num_seqs: int, heads: int, value_tiles: int,
                       state_bytes_per_segment: int, device: torch.device) -> int | None:
    """Tokens per segment, or None for one segment per sequence. Uses only static sizes.

    Splits only when the (sequence, head, value tile) programs could fill at most half the
    SMs, into the most segments that keep the programs within one wave (one per SM): segments
    are equal, so a partial second wave would nearly double the time, and each extra segment
    costs its K^T V and its k, v reads once more. 64 programs on 132 SMs become 128, not 192.
    """
    programs = num_seqs * heads * value_tiles
    if programs == 0 or total_tokens <= MIN_SEGMENT_CHUNKS * CHUNK:  # empty batch, or short
        return None
    target = PROGRAMS_PER_SM * _num_sms(device)
    want_segments = target // programs
    if want_segments < 2 or total_tokens <= MIN_SEGMENT_CHUNKS * CHUNK:
        return None
    max_segments = SCRATCH_BYTES // state_bytes_per_segment - num_seqs
    if max_segments < 2:
        return None
    want_segments = min(want_segments, max_segments)
    chunks = max(MIN_SEGMENT_CHUNKS, triton.cdiv(triton.cdiv(total_tokens, CHUNK), want_segments))
    # Grow until the static bound on segments, ⌈T/L⌉ + N, fits the scratch budget.
    while triton.cdiv(total_tokens, chunks * CHUNK) > max_segments:
        chunks *= 2
    return chunks * CHUNK


def build_segments(bos: torch.Tensor, eos: torch.Tensor, rows: torch.Tensor, total_tokens: int,
                   segment_len: int | None):
    """Segment table on the device, sized from static bounds (no host synchronization).

    Returns ``seg_meta [G, 4]`` int32 (sequence or -1, batch row, t_start, t_end), and each
    sequence's first and last segment index (int32 [N]).
    """
    n = bos.numel()
    device = bos.device
    lengths = (eos - bos).clamp(min=0)
    if segment_len is None:
        seq = torch.arange(n, device=device, dtype=torch.int32)
        meta = torch.stack([seq, rows.int(), bos.int(), (bos + lengths).int()], dim=1).contiguous()
        return meta, seq, seq
    nseg = torch.clamp((lengths + segment_len - 1) // segment_len, min=1)
    ends = torch.cumsum(nseg, 0)
    first = ends - nseg
    G = triton.cdiv(total_tokens, segment_len) + n   # ≥ Σ max(1, ⌈len/L⌉)
    g = torch.arange(G, device=device, dtype=ends.dtype)
    seq = torch.searchsorted(ends, g, right=True).clamp(max=n - 1)
    j = g - first[seq]
    t_start = bos[seq] + j * segment_len
    t_end = torch.minimum(t_start + segment_len, bos[seq] + lengths[seq])
    seq = torch.where(g < ends[-1], seq, torch.full_like(seq, -1))
    meta = torch.stack([seq, rows[seq.clamp(min=0)], t_start, t_end], dim=1).int().contiguous()
    return meta, first.int(), (ends - 1).int()


def prefill_tiles(dv: int, d: int, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int]:
    """(value columns per program, warps, pipeline stages) for the prefill kernel.

    bf16 with D ≤ 128: every value column up to 128 in one program, so Q K^T is computed once per
    chunk and head, with 8 warps (two warp groups) at 128 so that every product with the value
    tile as rows is split between the warp groups without repeating. The rest is not M1's shape
    or dtype and takes 32-wide tiles, which compile for sm_90a within shared memory and with no
    or few spills (Q K^T is then recomputed per value tile): wider bf16 heads (the fp32 state
    slice S^T [BV, D] must fit in registers next to the products), fp16 (TF32 products) and fp32
    (fp32 products, on the FMA units; two stages at D > 128, where three need 336 KiB).
    """
    if dtype == torch.bfloat16 and d <= 128:
        bv = max(16, min(128, triton.next_power_of_2(dv)))
        return bv, (8 if bv >= 128 else 4), 3
    return max(16, min(32, triton.next_power_of_2(dv))), 8, (2 if dtype == torch.float32 and d > 128 else 3)


def lightning_prefill_triton(q, k, v, slopes, initial_state, cu_seqlens, output_final_state,
                             segment_len: int | None = None, *, state_cache=None, slot_ids=None,
                             precision: str = "default", consistent: bool = False,
                             boundary_state: bool = False):
    """Triton prefill on validated inputs; see ``mm1_kernels.lightning_attention``.

    ``segment_len`` (a multiple of 64) forces the split into segments; by default it is chosen
    from the sizes and the SM count. ``precision`` ("default" or "high") picks how bf16 inputs
    meet the fp32 state and scores (module docstring); fp16 and fp32 inputs ignore it.

    With ``state_cache`` (fp32 ``[S, H, D, Dv]``) and ``slot_ids`` (``[N]``; ``initial_state``
    must then be None) sequence n starts from ``state_cache[slot_ids[n]]`` and its final state
    is written back there in place: read by the single pass (or by the scan when split) and
    written by the sequence's last segment. A negative slot is a padding sequence: zero
    outputs (and a zero ``final`` entry), cache untouched.

    ``consistent``: never split into segments, whatever the sizes (consistent mode: every
    token's output is the single pass's arithmetic, docs/m1_math.md §3.6). ``boundary_state``
    (needs ``consistent``): the final state is the state at each sequence's last chunk
    boundary (a trailing partial chunk does not advance it; ``BOUNDARY_STATE``), what
    ``lightning_chunk_cache_step`` keeps in its slots.
    """
    check_precision(precision)
    if boundary_state and not consistent:
        raise ValueError("boundary_state needs consistent=True (a single pass per sequence)")
    if consistent and segment_len is not None:
        raise ValueError("consistent=True never splits a sequence: segment_len must be None")
    B, T, H, D = q.shape
    DV = v.shape[-1]
    device = q.device
    if cu_seqlens is None:
        N = B
        bos = torch.zeros(B, dtype=torch.int64, device=device)
        eos = torch.full((B,), T, dtype=torch.int64, device=device)
        rows = torch.arange(B, dtype=torch.int64, device=device)
    else:
        N = cu_seqlens.numel() - 1
        cu = cu_seqlens.to(torch.int64).clamp(0, T)
        bos, eos = cu[:-1], torch.maximum(cu[1:], cu[:-1])
        rows = torch.zeros(N, dtype=torch.int64, device=device)
    has_slots = state_cache is not None
    if has_slots:
        if initial_state is not None or slot_ids is None:
            raise ValueError("state_cache needs slot_ids and excludes initial_state")
        initial_state = state_cache
    BD = max(16, triton.next_power_of_2(D))
    BV, num_warps, num_stages = prefill_tiles(DV, D, q.dtype)
    nv = triton.cdiv(DV, BV)
    if segment_len is None:
        if not consistent:
            segment_len = choose_segment_len(B * T, N, H, nv, H * D * DV * 4, device)
    elif segment_len % CHUNK or segment_len <= 0:
        raise ValueError(f"segment_len must be a positive multiple of {CHUNK}, got {segment_len}")
    meta, first, last = build_segments(bos, eos, rows, B * T if cu_seqlens is None else T, segment_len)
    G = meta.shape[0]

    o = torch.empty(B, T, H, DV, dtype=q.dtype, device=device)
    final = torch.empty(N, H, D, DV, dtype=torch.float32, device=device) if output_final_state else None
    dummy = torch.empty(1, dtype=torch.float32, device=device)
    init = initial_state if initial_state is not None else dummy
    slots = slot_ids if has_slots else last
    num_slots = state_cache.shape[0] if has_slots else 0
    dot_mode = {torch.float32: "ieee", torch.float16: "tf32"}.get(q.dtype) or BF16_DOT_MODE[precision]
    common = dict(C=CHUNK, BD=BD, BV=BV, DOT_MODE=dot_mode, HAS_SLOTS=has_slots, num_warps=num_warps,
                  num_stages=num_stages,
                  EXACT_TILES=(D == BD and DV % BV == 0), BOUNDARY_STATE=boundary_state)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3])
    grid = (G * H * nv,)
    if segment_len is None:
        lightning_segment_kernel[grid](
            q, k, v, o, slopes, meta, dummy, init, final if final is not None else dummy, last, slots,
            *strides, H, D, DV, num_slots, LOCAL_PASS=False, USE_SEG_STATE=False,
            HAS_INIT=initial_state is not None, STORE_FINAL=final is not None, **common)
        return o, final

    seg_state = torch.empty(G, H, D, DV, dtype=torch.float32, device=device)
    lightning_segment_kernel[grid](
        q, k, v, o, slopes, meta, seg_state, dummy, dummy, last, slots,
        *strides, H, D, DV, num_slots, LOCAL_PASS=True, USE_SEG_STATE=False,
        HAS_INIT=False, STORE_FINAL=False, **common)
    lightning_segment_scan_kernel[(N, H, triton.cdiv(DV, SCAN_BV))](
        slopes, seg_state, init, first, last, slots, H, D, DV, segment_len, num_slots,
        BD=BD, BV=SCAN_BV, HAS_INIT=initial_state is not None, HAS_SLOTS=has_slots, num_warps=4)
    # The output pass reads incoming states from seg_state only; with slots it writes each
    # sequence's final state back into the cache (init) from the sequence's last segment.
    lightning_segment_kernel[grid](
        q, k, v, o, slopes, meta, seg_state, init, final if final is not None else dummy, last, slots,
        *strides, H, D, DV, num_slots, LOCAL_PASS=False, USE_SEG_STATE=True,
        HAS_INIT=False, STORE_FINAL=final is not None, **common)
    return o, final
