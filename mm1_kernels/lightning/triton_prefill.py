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
segments of 4 MiB), while its 64 heads × 2 value tiles × up to 256 segments fill any GPU.
The price of splitting is that segment contributions K^T V are computed twice (passes 1 and 3),
about 2·C·D² extra FLOPs per chunk on top of ~6·C·D² (C=64, D=128): +33% arithmetic, which the
occupancy gain more than repays for one long sequence; nothing is recomputed when not split.

All offsets into q/k/v/o and the states are computed in 64-bit, since ``T·H·D`` passes 2^31 at
one million tokens. Decay exponents are never negative, so nothing overflows; ``λ^m`` underflows
to 0 for fast heads, which is the correct value.

Precision: the state and every accumulation are fp32. For fp32 inputs every matmul runs in
full fp32 (``input_precision="ieee"``, no TF32). For bf16/fp16 inputs, Q K^T takes the 16-bit
inputs (exact products, fp32 accumulation); the three products with an fp32 operand (decayed
scores × V, Q × S, decayed K^T × V) run as TF32 (10-bit mantissa) rather than rounding the
fp32 scores and state to bf16 (7-bit): under the CPU interpreter that choice measured 6-8e-3
relative error against the fp64 recurrence, TF32 3.3e-3, most of it the final conversion of o
to bf16 (which the interpreter truncates; GPUs round to nearest, ~1.7e-3). The kernel moves
~64 KiB per chunk and head against ~8 MFLOP, close to the bf16 ridge, so TF32's half rate
costs little.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 64
SCRATCH_BYTES = 1 << 30
# Programs per SM below which one long sequence is split into segments.
PROGRAMS_PER_SM = 8
MIN_SEGMENT_CHUNKS = 4


@triton.jit
def _load_tile(ptr, row0, stride_t, offs_c, offs_d, D, mask_rows):
    # A [C, BD] tile of one head, rows [row0, row0 + C) along T, 64-bit addressing.
    ptrs = ptr + (row0 + offs_c).to(tl.int64)[:, None] * stride_t + offs_d[None, :]
    return tl.load(ptrs, mask=mask_rows[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def lightning_segment_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, slopes_ptr,
    seg_meta_ptr,             # int32 [G, 4]: sequence (-1 = idle program), batch row, t_start, t_end
    seg_state_ptr,            # fp32 [G, H, D, D]: written (LOCAL_PASS) or read (USE_SEG_STATE)
    init_state_ptr,           # fp32 [N, H, D, D] (HAS_INIT)
    final_state_ptr,          # fp32 [N, H, D, D] (STORE_FINAL)
    seq_last_seg_ptr,         # int32 [N]: index of each sequence's last segment
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    H, D, DV,
    C: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    LOCAL_PASS: tl.constexpr, USE_SEG_STATE: tl.constexpr,
    HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
    FP32_INPUTS: tl.constexpr, STATE_PRECISION: tl.constexpr,
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
    state_offs = offs_d.to(tl.int64)[:, None] * DV + offs_v[None, :]
    head_state = (seq.to(tl.int64) * H + h) * D * DV
    seg_head_state = (g.to(tl.int64) * H + h) * D * DV

    if USE_SEG_STATE:
        S = tl.load(seg_state_ptr + seg_head_state + state_offs, mask=state_mask, other=0.0)
    elif HAS_INIT:
        S = tl.load(init_state_ptr + head_state + state_offs, mask=state_mask, other=0.0)
    else:
        S = tl.zeros([BD, BV], dtype=tl.float32)

    q_base = q_ptr + row * stride_qb + h * stride_qh
    k_base = k_ptr + row * stride_kb + h * stride_kh
    v_base = v_ptr + row * stride_vb + h * stride_vh
    o_base = o_ptr + row * stride_ob + h * stride_oh
    # Decay of the intra-chunk scores: λ^(j-i) below the diagonal, exponent never negative.
    diff = (offs_c[:, None] - offs_c[None, :]).to(tl.float32)
    intra_decay = tl.where(diff >= 0, tl.exp(-s * tl.maximum(diff, 0.0)), 0.0)
    q_decay = tl.exp(-s * (offs_c + 1).to(tl.float32))

    for t0 in range(t_start, t_end, C):
        m = tl.minimum(t_end - t0, C)
        mask_c = offs_c < m
        k = _load_tile(k_base, t0, stride_kt, offs_c, offs_d, D, mask_c)
        vp = v_base + (t0 + offs_c).to(tl.int64)[:, None] * stride_vt + offs_v[None, :]
        v = tl.load(vp, mask=mask_c[:, None] & mask_v[None, :], other=0.0)
        v32 = v.to(tl.float32)
        if not LOCAL_PASS:
            q = _load_tile(q_base, t0, stride_qt, offs_c, offs_d, D, mask_c)
            if FP32_INPUTS:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:  # 16-bit products are exact; accumulation is fp32
                scores = tl.dot(q, tl.trans(k))
            scores = scores * intra_decay
            out = tl.dot(scores, v32, input_precision=STATE_PRECISION)
            out += tl.dot(q.to(tl.float32), S, input_precision=STATE_PRECISION) * q_decay[:, None]
            op = o_base + (t0 + offs_c).to(tl.int64)[:, None] * stride_ot + offs_v[None, :]
            tl.store(op, out.to(o_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_v[None, :])
        # Rows past m were loaded as zeros, so they add nothing; the decay uses the true m.
        k_decay = tl.where(mask_c, tl.exp(-s * tl.maximum(m - 1 - offs_c, 0).to(tl.float32)), 0.0)
        kd = k.to(tl.float32) * k_decay[:, None]
        S = S * tl.exp(-s * m.to(tl.float32)) + tl.dot(tl.trans(kd), v32, input_precision=STATE_PRECISION)

    if LOCAL_PASS:
        tl.store(seg_state_ptr + seg_head_state + state_offs, S, mask=state_mask)
    elif STORE_FINAL:
        if is_last:
            tl.store(final_state_ptr + head_state + state_offs, S, mask=state_mask)


@triton.jit
def lightning_segment_scan_kernel(
    slopes_ptr, seg_state_ptr, init_state_ptr, seq_first_seg_ptr, seq_last_seg_ptr,
    H, D, DV, segment_len,
    BD: tl.constexpr, BV: tl.constexpr, HAS_INIT: tl.constexpr,
):
    """Replace each segment's local state by its incoming state, sequence by sequence."""
    n = tl.program_id(0)
    h = tl.program_id(1)
    iv = tl.program_id(2)
    first = tl.load(seq_first_seg_ptr + n)
    last = tl.load(seq_last_seg_ptr + n)
    s = tl.load(slopes_ptr + h).to(tl.float32)
    # Every segment but a sequence's last holds exactly segment_len tokens.
    seg_decay = tl.exp(-s * segment_len.to(tl.float32))
    offs_d = tl.arange(0, BD)
    offs_v = iv * BV + tl.arange(0, BV)
    state_mask = (offs_d < D)[:, None] & (offs_v < DV)[None, :]
    state_offs = offs_d.to(tl.int64)[:, None] * DV + offs_v[None, :]
    per_segment = tl.full([], H * D * DV, tl.int64)
    head_offs = h * D * DV + state_offs
    if HAS_INIT:
        S = tl.load(init_state_ptr + n * per_segment + head_offs, mask=state_mask, other=0.0)
    else:
        S = tl.zeros([BD, BV], dtype=tl.float32)
    for g in range(first, last):
        ptrs = seg_state_ptr + g * per_segment + head_offs
        local = tl.load(ptrs, mask=state_mask, other=0.0)
        tl.store(ptrs, S, mask=state_mask)
        S = S * seg_decay + local
    tl.store(seg_state_ptr + last * per_segment + head_offs, S, mask=state_mask)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
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
    return min(64, triton.next_power_of_2(dv))


def lightning_prefill_triton(q, k, v, slopes, initial_state, cu_seqlens, output_final_state,
                             segment_len: int | None = None):
    """Triton prefill on validated inputs; see ``mm1_kernels.lightning_attention``.

    ``segment_len`` (a multiple of 64) forces the split into segments; by default it is chosen
    from the sizes and the SM count.
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
    BD = max(16, triton.next_power_of_2(D))
    BV = max(16, _value_tile(DV))
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
    fp32_inputs = q.dtype == torch.float32
    num_warps = 8 if BD * BV >= 128 * 64 else 4
    common = dict(C=CHUNK, BD=BD, BV=BV, FP32_INPUTS=fp32_inputs,
                  STATE_PRECISION="ieee" if fp32_inputs else "tf32", num_warps=num_warps)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3])
    grid = (G, H, nv)
    if segment_len is None:
        lightning_segment_kernel[grid](
            q, k, v, o, slopes, meta, dummy, init, final if final is not None else dummy, last,
            *strides, H, D, DV, LOCAL_PASS=False, USE_SEG_STATE=False,
            HAS_INIT=initial_state is not None, STORE_FINAL=final is not None, **common)
        return o, final

    seg_state = torch.empty(G, H, D, DV, dtype=torch.float32, device=device)
    lightning_segment_kernel[grid](
        q, k, v, o, slopes, meta, seg_state, dummy, dummy, last,
        *strides, H, D, DV, LOCAL_PASS=True, USE_SEG_STATE=False,
        HAS_INIT=False, STORE_FINAL=False, **common)
    lightning_segment_scan_kernel[(N, H, nv)](
        slopes, seg_state, init, first, last, H, D, DV, segment_len,
        BD=BD, BV=BV, HAS_INIT=initial_state is not None, num_warps=4)
    lightning_segment_kernel[grid](
        q, k, v, o, slopes, meta, seg_state, dummy, final if final is not None else dummy, last,
        *strides, H, D, DV, LOCAL_PASS=False, USE_SEG_STATE=True,
        HAS_INIT=False, STORE_FINAL=final is not None, **common)
    return o, final
