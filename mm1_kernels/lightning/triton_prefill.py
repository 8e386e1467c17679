"""Chunked lightning-attention prefill in Triton.

Work decomposition
------------------
Every sequence is cut into *segments* of ``segment_len`` tokens (a multiple of the chunk
size C = 64); one program owns one (segment, head, value-tile) and walks the segment's
chunks in order, keeping its ``[D, BV]`` slice of the fp32 state in registers. Per chunk::

    o     = (Q K^T ∘ M) V  +  diag(λ^(j+1)) Q S          M[j, i] = λ^(j-i) for i ≤ j, else 0
    S_out = λ^m S + (diag(λ^(m-1-i)) K)^T V

When a sequence has one segment (short sequences, or enough (sequence, head) programs to fill
the GPU) this is a single kernel. A long sequence is split into several segments so that the
grid still fills the GPU, and three kernels run:

1. ``local state``: each non-last segment's own contribution, started from a zero state;
2. ``scan``: per (sequence, head, value tile), a sequential pass over segment boundaries that
   turns local states into each segment's incoming state (``S ← λ^L S + local``), starting from
   ``initial_state``;
3. ``output``: every segment again, from its incoming state, writing ``o`` (and the final state
   from each sequence's last segment).

Scratch memory is one fp32 ``[H, D, D]`` state per segment, nothing per chunk: the number of
segments is capped so that this stays under ``SCRATCH_BYTES`` (1 GiB). A single 1,048,576-token
sequence at H=64, D=128 therefore runs in one call with at most 1 GiB of scratch (at most 256
segments of 4 MiB), while its 64 heads × 4 value tiles × the segments give several programs per
SM on any GPU. The price of splitting is that segment contributions K^T V are computed twice
(passes 1 and 3): about 2·C·D² extra FLOPs per chunk on top of ~6·C·D² (C=64, D=128), which buys
the parallelism one long sequence otherwise lacks; nothing is recomputed when not split.

Slot-indexed state cache (``state_cache`` / ``slot_ids``, a serving engine's chunked prefill):
``HAS_SLOTS`` makes ``init_state_ptr`` the cache ``[S, H, D, D]`` and indexes it through
``slot_ids[seq]`` in place: the single pass reads the slot at its start and writes it at its end;
when split, the scan reads the slot and the sequence's last segment (output pass) writes it, so
no program reads a slot another program of the same launch writes. A negative slot (padding)
skips all work: zero outputs, cache untouched. An out-of-range slot (host check skipped under
graph capture) gives NaN outputs and leaves the cache untouched. For sm_90a at D=128 the bf16
single pass with slots compiles to 255 registers and 8 B/thread of spills (Triton 3.6; 52 B with
3.9), like the pass without slots (0-8 B; 16-60 B).

Tile bases and state offsets are 64-bit (one 64-bit scalar base per chunk and tensor, 32-bit
offsets inside the chunk), since ``T·H·D`` passes 2^31 at one million tokens. Decay exponents
are never negative, so nothing overflows; ``λ^m`` underflows to 0 for fast heads, which is the
correct value.

Precision: the state and every accumulation are fp32. fp32 inputs: every matmul in full fp32
(``input_precision="ieee"``, no TF32). bf16 inputs: Q K^T takes the inputs as they are (exact
products, fp32 accumulation); the three products with an fp32 operand (decayed scores × V,
Q × S, decayed K^T × V) split that operand into a bf16 pair hi + lo (~16 mantissa bits) and run
two bf16 matmuls, rather than rounding the fp32 scores and state to bf16 (8 bits). Measured under
the CPU interpreter against the fp64 recurrence: rounding gave 6-8e-3 relative error, the split
gives the floor set by storing o in bf16 (~3e-3 there, since the interpreter truncates instead of
rounding; ~1.7e-3 with round-to-nearest on a GPU). fp16 inputs cannot use the pair (a state
above 65504 would overflow), so they are upcast and multiplied in TF32, exact for fp16 values.

Compiled for sm_90a with M1's alignments (``tests/test_triton_aot.py`` does this on a CPU), the
bf16 output pass at D=128 with 8 warps and 32-wide value tiles uses 255 registers, spills
8 B/thread and 108 KiB of shared memory; 64-wide tiles spill 48 B (4 warps: 420 B), and 64-bit
per-element addresses (before block pointers) spilled ~1 KB. Which of these is fastest is for a
GPU run to say.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._triton_interpret import interpreted_with_fixes

CHUNK = 64
SCRATCH_BYTES = 1 << 30
# Programs per SM below which one long sequence is split into segments.
PROGRAMS_PER_SM = 8
MIN_SEGMENT_CHUNKS = 4


@triton.jit
def _dot_split(a16, b32, acc):
    """acc + a16 @ b32 for a 16-bit a and fp32 b, with b split into a 16-bit hi + lo pair."""
    b_hi = b32.to(a16.dtype)
    acc = tl.dot(a16, b_hi, acc)
    return tl.dot(a16, (b32 - b_hi.to(tl.float32)).to(a16.dtype), acc)


@triton.jit
def _dot_split_lhs(a32, b16, acc):
    """acc + a32 @ b16 for an fp32 a and 16-bit b, with a split into a 16-bit hi + lo pair."""
    a_hi = a32.to(b16.dtype)
    acc = tl.dot(a_hi, b16, acc)
    return tl.dot((a32 - a_hi.to(tl.float32)).to(b16.dtype), b16, acc)


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
    DOT_MODE: tl.constexpr,
):
    g = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
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
    mask_v = offs_v < DV
    mask_d = offs_d < D
    state_mask = mask_d[:, None] & mask_v[None, :]
    # 64-bit scalar bases, 32-bit offsets within one [D, DV] state.
    state_offs = offs_d[:, None] * DV + offs_v[None, :]
    final_head_state = (seq.to(tl.int64) * H + h) * D * DV
    seg_head_state = (g.to(tl.int64) * H + h) * D * DV
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
                        tl.store(final_state_ptr + final_head_state + state_offs,
                                 tl.zeros([BD, BV], dtype=tl.float32) + fill, mask=state_mask)
            return
        head_state = (slot * H + h) * D * DV
    else:
        head_state = final_head_state

    if USE_SEG_STATE:
        S = tl.load(seg_state_ptr + seg_head_state + state_offs, mask=state_mask, other=0.0)
    elif HAS_INIT:
        S = tl.load(init_state_ptr + head_state + state_offs, mask=state_mask, other=0.0)
    else:
        S = tl.zeros([BD, BV], dtype=tl.float32)

    # Bases are 64-bit products: a head stride can itself reach 2^27 (a head-major
    # [B, H, T, D] view at T = 1M), so h · stride_h overflows int32 for most heads.
    # Plain pointers, not block pointers (removed in Triton 3.9) and not tensor descriptors
    # (their 16-byte stride and base alignment rules exclude strided views such as a fused qkv
    # tensor with odd D; issue 11 rebuilds this kernel around TMA where it fits). Each chunk
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
    o_offs = offs_c[:, None] * stride_ot + offs_v[None, :]
    q_decay = tl.exp(-s * (offs_c + 1).to(tl.float32))
    causal = offs_c[:, None] >= offs_c[None, :]
    # λ^(j-i) for i ≤ j; the exponent is clamped at 0 above the diagonal, where the select in
    # the loop zeroes the scores (a select, not a multiply: a NaN or inf in a later token's k
    # must not reach an earlier token's output through 0 · NaN).
    intra_decay = tl.exp(-s * tl.maximum(offs_c[:, None] - offs_c[None, :], 0).to(tl.float32))

    for t0 in range(t_start, t_end, C):
        m = tl.minimum(t_end - t0, C)
        row_ok = offs_c < m
        k = tl.load(k_rows + k_offs, mask=row_ok[:, None] & mask_d[None, :], other=0.0)
        v = tl.load(v_rows + v_offs, mask=row_ok[:, None] & mask_v[None, :], other=0.0)
        if not LOCAL_PASS:
            q = tl.load(q_rows + q_offs, mask=row_ok[:, None] & mask_d[None, :], other=0.0)
            if DOT_MODE == "bf16x2":
                # Products of bf16 inputs are exact, accumulation is fp32. The fp32 state and
                # decayed scores enter the tensor cores as a bf16 pair (hi + lo), which keeps
                # ~16 mantissa bits at the cost of a second matmul; see the module docstring.
                scores = tl.where(causal, tl.dot(q, tl.trans(k)) * intra_decay, 0.0)
                out = _dot_split(q, S, tl.zeros([C, BV], tl.float32)) * q_decay[:, None]
                out = _dot_split_lhs(scores, v, out)
            else:  # fp32 inputs in full fp32 ("ieee"); fp16 inputs upcast, exact in TF32 ("tf32")
                scores = tl.where(causal, tl.dot(q, tl.trans(k), input_precision=DOT_MODE) * intra_decay, 0.0)
                out = tl.dot(q.to(tl.float32), S, input_precision=DOT_MODE) * q_decay[:, None]
                out = tl.dot(scores, v.to(tl.float32), out, input_precision=DOT_MODE)
            tl.store(o_rows + o_offs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & mask_v[None, :])
            q_rows += C * stride_qt
            o_rows += C * stride_ot
        # Rows past m were loaded as zeros, so they add nothing; the decay uses the true m.
        k_decay = tl.exp(-s * tl.maximum(m - 1 - offs_c, 0).to(tl.float32))
        kd = tl.trans(k.to(tl.float32) * k_decay[:, None])
        S = S * tl.exp(-s * m.to(tl.float32))
        if DOT_MODE == "bf16x2":
            S = _dot_split_lhs(kd, v, S)
        else:
            S = tl.dot(kd, v.to(tl.float32), S, input_precision=DOT_MODE)
        k_rows += C * stride_kt
        v_rows += C * stride_vt

    if LOCAL_PASS:
        tl.store(seg_state_ptr + seg_head_state + state_offs, S, mask=state_mask)
    else:
        if is_last:
            if HAS_SLOTS:
                # Back into the sequence's slot, in place. The addresses are rebuilt from memory
                # after the loop rather than kept live through it: the bf16 output pass sits at
                # the register limit (ptxas: 4-52 B/thread of spills instead of 20-72).
                seq_end = tl.load(seg_meta_ptr + g * 4 + 0).to(tl.int64)
                slot_end = tl.load(slot_ptr + seq_end).to(tl.int64)
                if STORE_FINAL:
                    tl.store(final_state_ptr + (seq_end * H + h) * D * DV + state_offs, S, mask=state_mask)
                tl.store(init_state_ptr + (slot_end * H + h) * D * DV + state_offs, S, mask=state_mask)
            elif STORE_FINAL:
                tl.store(final_state_ptr + final_head_state + state_offs, S, mask=state_mask)


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
    """Tokens per segment, or None for one segment per sequence. Uses only static sizes."""
    programs = num_seqs * heads * value_tiles
    target = PROGRAMS_PER_SM * _num_sms(device)
    if programs >= target or total_tokens <= MIN_SEGMENT_CHUNKS * CHUNK:
        return None
    max_segments = SCRATCH_BYTES // state_bytes_per_segment - num_seqs
    if max_segments < 2:
        return None
    want_segments = min(triton.cdiv(target, heads * value_tiles), max_segments)
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


def _value_tile(dv: int) -> int:
    # At D = 128 a 32-wide value tile compiles for sm_90a with 8 B/thread of spills against 48 B
    # for 64 wide (ptxas -v) and doubles the programs available to fill the GPU, at the cost of
    # recomputing Q K^T for each of the 4 value tiles.
    return max(16, min(32 if dv > 64 else 64, triton.next_power_of_2(dv)))


def lightning_prefill_triton(q, k, v, slopes, initial_state, cu_seqlens, output_final_state,
                             segment_len: int | None = None, *, state_cache=None, slot_ids=None):
    """Triton prefill on validated inputs; see ``mm1_kernels.lightning_attention``.

    ``segment_len`` (a multiple of 64) forces the split into segments; by default it is chosen
    from the sizes and the SM count.

    With ``state_cache`` (fp32 ``[S, H, D, Dv]``) and ``slot_ids`` (``[N]``; ``initial_state``
    must then be None) sequence n starts from ``state_cache[slot_ids[n]]`` and its final state
    is written back there in place: read by the single pass (or by the scan when split) and
    written by the sequence's last segment. A negative slot is a padding sequence: zero
    outputs (and a zero ``final`` entry), cache untouched.
    """
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
    BV = _value_tile(DV)
    nv = triton.cdiv(DV, BV)
    if segment_len is None:
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
    dot_mode = {torch.float32: "ieee", torch.float16: "tf32", torch.bfloat16: "bf16x2"}[q.dtype]
    num_warps = 8 if BD >= 128 else 4
    common = dict(C=CHUNK, BD=BD, BV=BV, DOT_MODE=dot_mode, HAS_SLOTS=has_slots, num_warps=num_warps)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3])
    grid = (G, H, nv)
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
    lightning_segment_scan_kernel[(N, H, nv)](
        slopes, seg_state, init, first, last, slots, H, D, DV, segment_len, num_slots,
        BD=BD, BV=BV, HAS_INIT=initial_state is not None, HAS_SLOTS=has_slots, num_warps=4)
    # The output pass reads incoming states from seg_state only; with slots it writes each
    # sequence's final state back into the cache (init) from the sequence's last segment.
    lightning_segment_kernel[grid](
        q, k, v, o, slopes, meta, seg_state, init, final if final is not None else dummy, last, slots,
        *strides, H, D, DV, num_slots, LOCAL_PASS=False, USE_SEG_STATE=True,
        HAS_INIT=False, STORE_FINAL=final is not None, **common)
    return o, final
