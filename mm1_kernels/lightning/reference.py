"""Lightning attention, the plain math (docs/m1_math.md §3). This file is the truth.

Per head h with decay ``λ_h = exp(-s_h)`` and an fp32 (or fp64) state ``S [D, D]``::

    S_t = λ · S_{t-1} + k_t^T v_t
    o_t = q_t · S_t

No 1/sqrt(D) scale, and never an inverse decay (``λ^-n`` overflows at M1's slopes).
"""
from __future__ import annotations

import math

import torch


def _power_of_two_base(n: int) -> list[float]:
    # ALiBi base for a power-of-two head count: 2^(-8(h+1)/n).
    return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]


def lightning_base_slopes(num_heads: int) -> list[float]:
    """The per-head base of M1's slopes, before the layer factor."""
    if num_heads < 1:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    if num_heads & (num_heads - 1) == 0:
        return _power_of_two_base(num_heads)
    p = 2 ** int(math.floor(math.log2(num_heads)))
    return _power_of_two_base(p) + _power_of_two_base(2 * p)[0::2][: num_heads - p]


def lightning_slopes(num_heads: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    """Decay rates ``s`` [num_heads] fp32 for GLOBAL layer ``layer_idx`` of a ``num_layers`` model.

    ``s_h = base_h · (1 - layer_idx / (num_layers - 1) + 1e-5)``; the decay is ``exp(-s_h)``.
    A slice of the model keeps the original ``layer_idx`` and ``num_layers``.
    """
    for name, value in (("num_heads", num_heads), ("layer_idx", layer_idx), ("num_layers", num_layers)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if num_layers < 2:
        raise ValueError(f"num_layers must be at least 2, got {num_layers}")
    if not 0 <= layer_idx < num_layers:
        raise ValueError(f"layer_idx must be in [0, {num_layers}), got {layer_idx}")
    factor = 1.0 - layer_idx / (num_layers - 1) + 1e-5
    # Computed in double, rounded once to fp32.
    return torch.tensor([b * factor for b in lightning_base_slopes(num_heads)], dtype=torch.float64).float()


def _sequences(T: int, B: int, cu_seqlens: torch.Tensor | None):
    """(batch row, start, end) for each sequence."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    cu = cu_seqlens.tolist()
    return [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]


def lightning_recurrence(q, k, v, slopes, initial_state=None, cu_seqlens=None,
                         dtype: torch.dtype = torch.float64):
    """Token-by-token recurrence in ``dtype`` (fp64 by default). Returns (o, final_state).

    Shapes: q, k, v [B, T, H, D]; slopes [H]; states [N, H, D, D] where N is B, or the number
    of sequences when ``cu_seqlens`` ([N+1], B == 1) is given. ``o`` is returned in ``dtype``.
    """
    B, T, H, D = q.shape
    qd, kd, vd = (x.to(dtype) for x in (q, k, v))
    lam = torch.exp(-slopes.to(dtype))[:, None, None]  # [H, 1, 1]
    seqs = _sequences(T, B, cu_seqlens)
    o = torch.zeros(B, T, H, v.shape[-1], dtype=dtype, device=q.device)
    final = torch.empty(len(seqs), H, D, v.shape[-1], dtype=dtype, device=q.device)
    for n, (b, start, end) in enumerate(seqs):
        S = (initial_state[n].to(dtype).clone() if initial_state is not None
             else torch.zeros(H, D, v.shape[-1], dtype=dtype, device=q.device))
        for t in range(start, end):
            S = lam * S + kd[b, t, :, :, None] * vd[b, t, :, None, :]
            o[b, t] = torch.einsum("hd,hde->he", qd[b, t], S)
        final[n] = S
    return o, final


def _causal_matmul(scores: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``scores @ v`` for lower-triangular ``scores [H, m, m]`` that never reads ``v_i`` into a
    row ``j < i``: a plain matmul forms ``0 · v_i``, which is NaN when ``v_i`` is, so a NaN or
    inf in a later token's v would reach earlier tokens' outputs.

    Row j sums over i ≤ j. Split the (power-of-two padded) rows in halves: the lower half
    reads the upper half's v through one dense block, and each half recurses on its own
    diagonal block; all blocks of one size are a single batched matmul, so this is
    log2(m) matmuls with half the FLOPs of the dense one, plus the diagonal.
    """
    H, m, _ = scores.shape
    n = 1 << max(m - 1, 0).bit_length()
    if n != m:
        scores = torch.nn.functional.pad(scores, (0, n - m, 0, n - m))
        v = torch.nn.functional.pad(v, (0, 0, 0, n - m))
    dv = v.shape[-1]
    out = torch.diagonal(scores, dim1=1, dim2=2)[..., None] * v                # i == j
    b = 1
    while b < n:
        blocks = n // (2 * b)
        square = scores.reshape(H, blocks, 2 * b, blocks, 2 * b).diagonal(dim1=1, dim2=3)
        lower_left = square.permute(0, 3, 1, 2)[:, :, b:, :b]                 # [H, blocks, b, b]
        upper_v = v.reshape(H, blocks, 2 * b, dv)[:, :, :b]                   # [H, blocks, b, dv]
        out.view(H, blocks, 2 * b, dv)[:, :, b:] += lower_left @ upper_v
        b *= 2
    return out[:, :m]


def _chunk_setup(q, v, slopes, cu_seqlens, C, dtype):
    """What both chunked forms start from: slopes in ``dtype``, the sequences, empty o and final
    states, chunk positions, the causal mask and the intra-chunk decays λ^(j-i) [H, C, C]."""
    B, T, H, D = q.shape
    s = slopes.to(device=q.device, dtype=dtype)
    seqs = _sequences(T, B, cu_seqlens)
    o = torch.empty(B, T, H, v.shape[-1], dtype=q.dtype, device=q.device)
    final = torch.empty(len(seqs), H, D, v.shape[-1], dtype=torch.float32, device=q.device)
    pos = torch.arange(C, device=q.device, dtype=dtype)
    diff = pos[:, None] - pos[None, :]                                        # j - i
    causal = diff >= 0
    intra_decay = torch.where(causal, torch.exp(-s[:, None, None] * diff.clamp(min=0)), 0.0)  # [H, C, C]
    return s, seqs, o, final, pos, causal, intra_decay


def lightning_chunked(q, k, v, slopes, initial_state=None, cu_seqlens=None,
                      chunk_size: int = 64, dtype: torch.dtype = torch.float32,
                      consistent: bool = False, boundary_state: bool = False):
    """The chunked form, computed in ``dtype`` (fp32: the torch backend). Returns (o, final_state).

    For a block of m ≤ C tokens starting at c with incoming state S_in::

        o_{c+j} = λ^(j+1) q_{c+j} S_in + Σ_{i≤j} λ^(j-i) (q_{c+j}·k_{c+i}) v_{c+i}
        S_out   = λ^m S_in + Σ_{i<m} λ^(m-1-i) k_{c+i}^T v_{c+i}

    Only non-negative decay exponents appear. ``o`` is returned in q's dtype, states in fp32.

    ``consistent`` (consistent mode, docs/m1_math.md §3.6): every block is padded with zero rows
    to C rows and copied contiguous, so every product has one shape and layout whatever m and
    the inputs' strides are; a row's output is then bitwise a function of its own q, its
    block's k, v and S_in, the same whether later rows of the block exist or not.
    ``boundary_state`` (needs ``consistent``): a sequence's trailing partial block does not
    advance the state, so the final state is the one at its last block boundary.
    """
    if boundary_state and not consistent:
        raise ValueError("boundary_state needs consistent=True")
    if consistent:
        return _lightning_chunked_fixed(q, k, v, slopes, initial_state, cu_seqlens, chunk_size, dtype,
                                        boundary_state)
    B, T, H, D = q.shape
    Dv = v.shape[-1]
    s, seqs, o, final, pos, causal, intra_decay = _chunk_setup(q, v, slopes, cu_seqlens, chunk_size, dtype)
    for n, (b, start, end) in enumerate(seqs):
        S = (initial_state[n].to(dtype) if initial_state is not None
             else torch.zeros(H, D, Dv, dtype=dtype, device=q.device))
        for c in range(start, end, chunk_size):
            m = min(chunk_size, end - c)
            qc = q[b, c:c + m].to(dtype).transpose(0, 1)                      # [H, m, D]
            kc = k[b, c:c + m].to(dtype).transpose(0, 1)
            vc = v[b, c:c + m].to(dtype).transpose(0, 1)                      # [H, m, Dv]
            # Select, not multiply: q_j·k_i of a later token i may be NaN/inf, and NaN·0 is NaN
            # (_causal_matmul never reads above the diagonal either; this keeps scores clean).
            scores = torch.where(causal[:m, :m], (qc @ kc.transpose(1, 2)) * intra_decay[:, :m, :m], 0.0)
            inter = (qc @ S) * torch.exp(-s[:, None, None] * (pos[:m] + 1)[None, :, None])
            o[b, c:c + m] = (_causal_matmul(scores, vc) + inter).transpose(0, 1).to(q.dtype)
            k_decay = torch.exp(-s[:, None, None] * (m - 1 - pos[:m])[None, :, None])
            S = torch.exp(-s * m)[:, None, None] * S + (kc * k_decay).transpose(1, 2) @ vc
        final[n] = S.float()
    return o, final


def _lightning_chunked_fixed(q, k, v, slopes, initial_state, cu_seqlens, C, dtype, boundary_state):
    """:func:`lightning_chunked` with every block padded to C rows (its ``consistent`` form)."""
    B, T, H, D = q.shape
    Dv = v.shape[-1]
    s, seqs, o, final, pos, causal, intra_decay = _chunk_setup(q, v, slopes, cu_seqlens, C, dtype)
    inter_decay = torch.exp(-s[:, None, None] * (pos + 1)[None, :, None])    # λ^(j+1) [H, C, 1]

    def block(x, b, c, m):
        # [H, C, ·] contiguous in dtype, rows past m zero.
        out = torch.zeros(x.shape[2], C, x.shape[3], dtype=dtype, device=x.device)
        out[:, :m] = x[b, c:c + m].transpose(0, 1)
        return out

    for n, (b, start, end) in enumerate(seqs):
        S = (initial_state[n].to(dtype).contiguous() if initial_state is not None
             else torch.zeros(H, D, Dv, dtype=dtype, device=q.device))
        for c in range(start, end, C):
            m = min(C, end - c)
            qc, kc, vc = block(q, b, c, m), block(k, b, c, m), block(v, b, c, m)
            scores = torch.where(causal, (qc @ kc.transpose(1, 2)) * intra_decay, 0.0)
            inter = (qc @ S) * inter_decay
            o[b, c:c + m] = (_causal_matmul(scores, vc) + inter)[:, :m].transpose(0, 1).to(q.dtype)
            if m == C or not boundary_state:
                # Padding rows of kc are zero; their exponent is clamped so no λ^-n appears.
                k_decay = torch.exp(-s[:, None, None] * (m - 1 - pos).clamp(min=0)[None, :, None])
                S = torch.exp(-s * m)[:, None, None] * S + (kc * k_decay).transpose(1, 2) @ vc
        final[n] = S.float()
    return o, final


def lightning_chunked_backward(do, dfinal, q, k, v, slopes, initial_state=None, cu_seqlens=None,
                               chunk_size: int = 64, dtype: torch.dtype = torch.float32,
                               need_dinit: bool = True, operand_dtype: torch.dtype | None = None):
    """Gradients of :func:`lightning_chunked` (docs/m1_math.md §3.5), computed in ``dtype``.

    ``do [B, T, H, Dv]``: gradient of o; ``dfinal`` (fp32 ``[N, H, D, Dv]`` or None): gradient of
    the final states. Returns ``(dq, dk, dv, dinit)``: dq/dk/dv in the input dtypes, ``dinit``
    fp32 ``[N, H, D, Dv]`` (None unless ``need_dinit``). With ``dH`` the gradient of the state
    after a block coming from later tokens (``dfinal`` after a sequence's last block), for a
    block of m tokens starting at c, j in 0..m-1, ``M[j, i] = λ^(j-i)`` for i ≤ j, else 0::

        dq[c+j] = λ^(j+1) do_j S_in^T + Σ_{i≤j} λ^(j-i) (do_j·v_i) k_i     (S_in recomputed)
        dk[c+j] = λ^(m-1-j) v_j dH^T + Σ_{i≥j} λ^(i-j) (do_i·v_j) q_i
        dv[c+j] = λ^(m-1-j) k_j dH   + Σ_{i≥j} λ^(i-j) (q_i·k_j) do_i
        dH_in   = λ^m dH + Σ_i λ^(i+1) q_i^T do_i                         (to the block before)

    and ``dinit`` is the ``dH_in`` of a sequence's first block. Only non-negative powers of λ.

    ``operand_dtype`` (tests only) rounds every matmul operand computed in ``dtype`` (states,
    decayed scores and rows) to that dtype first, as a plain 16-bit tensor-core backward would:
    the naive yardstick of the numerics contract.
    """
    B, T, H, D = q.shape
    Dv = v.shape[-1]
    s = slopes.to(device=q.device, dtype=dtype)
    seqs = _sequences(T, B, cu_seqlens)
    dq = torch.zeros(B, T, H, D, dtype=dtype, device=q.device)
    dk = torch.zeros(B, T, H, D, dtype=dtype, device=q.device)
    dv = torch.zeros(B, T, H, Dv, dtype=dtype, device=q.device)
    dinit = torch.empty(len(seqs), H, D, Dv, dtype=torch.float32, device=q.device) if need_dinit else None
    pos = torch.arange(chunk_size, device=q.device, dtype=dtype)
    diff = pos[:, None] - pos[None, :]                                        # j - i
    causal = diff >= 0
    decay = torch.where(causal, torch.exp(-s[:, None, None] * diff.clamp(min=0)), 0.0)  # M [H, C, C]
    lam = lambda e: torch.exp(-s[:, None, None] * e[None, :, None])          # noqa: E731  λ^e [H, m, 1]
    r = (lambda x: x) if operand_dtype is None else (lambda x: x.to(operand_dtype).to(dtype))  # noqa: E731
    blk = lambda x, b, c, m: x[b, c:c + m].to(dtype).transpose(0, 1)         # noqa: E731  [H, m, ·]
    for n, (b, start, end) in enumerate(seqs):
        # Forward sweep: dq needs each block's incoming state (recomputed, not stored by the op).
        S = (initial_state[n].to(dtype) if initial_state is not None
             else torch.zeros(H, D, Dv, dtype=dtype, device=q.device))
        for c in range(start, end, chunk_size):
            m = min(chunk_size, end - c)
            qc, kc, vc, doc = blk(q, b, c, m), blk(k, b, c, m), blk(v, b, c, m), blk(do, b, c, m)
            intra = (doc @ vc.transpose(1, 2)) * decay[:, :m, :m]              # [j, i] = λ^(j-i) do_j·v_i
            dq[b, c:c + m] = ((doc @ r(S).transpose(1, 2)) * lam(pos[:m] + 1) + r(intra) @ kc).transpose(0, 1)
            S = torch.exp(-s * m)[:, None, None] * S + r(kc * lam(m - 1 - pos[:m])).transpose(1, 2) @ vc
        # Reverse sweep: dH is the gradient of the state after the current block.
        dH = (dfinal[n].to(dtype) if dfinal is not None
              else torch.zeros(H, D, Dv, dtype=dtype, device=q.device))
        for c in reversed(range(start, end, chunk_size)):
            m = min(chunk_size, end - c)
            qc, kc, vc, doc = blk(q, b, c, m), blk(k, b, c, m), blk(v, b, c, m), blk(do, b, c, m)
            out_decay = lam(m - 1 - pos[:m])
            sc_dv = ((doc @ vc.transpose(1, 2)) * decay[:, :m, :m]).transpose(1, 2)  # [j, i] = λ^(i-j) do_i·v_j
            sc_qk = ((qc @ kc.transpose(1, 2)) * decay[:, :m, :m]).transpose(1, 2)   # [j, i] = λ^(i-j) q_i·k_j
            dk[b, c:c + m] = ((vc @ r(dH).transpose(1, 2)) * out_decay + r(sc_dv) @ qc).transpose(0, 1)
            dv[b, c:c + m] = ((kc @ r(dH)) * out_decay + r(sc_qk) @ doc).transpose(0, 1)
            dH = torch.exp(-s * m)[:, None, None] * dH + r(qc * lam(pos[:m] + 1)).transpose(1, 2) @ doc
        if need_dinit:
            dinit[n] = dH.float()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dinit


def lightning_decode_reference(q, k, v, slopes, state_cache, slot_ids=None):
    """One recurrence step in fp32, updating ``state_cache [S, H, D, D]`` in place.

    q, k, v [B, H, D]; ``slot_ids [B]`` (default ``arange(B)``) picks each row's slot; a negative
    slot is a padding row: its state is untouched and its output is zero.
    """
    B = q.shape[0]
    if slot_ids is None:
        slot_ids = torch.arange(B, device=q.device)
    o = torch.zeros(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)
    lam = torch.exp(-slopes.float())[:, None, None]
    valid = (slot_ids >= 0).nonzero().flatten()
    if valid.numel():
        slots = slot_ids[valid].long()
        S = lam * state_cache[slots] + k[valid].float()[..., :, None] * v[valid].float()[..., None, :]
        state_cache[slots] = S
        o[valid] = torch.einsum("bhd,bhde->bhe", q[valid].float(), S).to(q.dtype)
    return o


def lightning_decode_tokens_reference(q, k, v, slopes, state_cache, slot_ids=None, return_states=False,
                                      step=lightning_decode_reference):
    """T decode steps per row in order: q, k, v ``[B, T, H, D]``; ``state_cache`` updated in place.

    Returns ``(o [B, T, H, Dv], states)``: ``states`` is None, or with ``return_states`` the fp32
    state after each token ``[B, T, H, D, Dv]`` (zero for a padding row, NaN for an
    out-of-range slot). ``step`` is the one-token step (this module's reference, or a backend's
    ``[B, H, D]`` kernel with the same signature).
    """
    B, T = q.shape[:2]
    o = torch.empty(B, T, q.shape[2], v.shape[-1], dtype=q.dtype, device=q.device)
    states = (torch.empty(B, T, *state_cache.shape[1:], dtype=torch.float32, device=q.device)
              if return_states else None)
    if return_states and slot_ids is None:
        slot_ids = torch.arange(B, device=q.device)
    for t in range(T):
        o[:, t] = step(q[:, t], k[:, t], v[:, t], slopes, state_cache, slot_ids)
        if return_states:
            states[:, t] = gather_slot_states(state_cache, slot_ids)
    return o, states


def slot_fill(slot_ids, num_slots):
    """``(valid, fill)`` per sequence: whether its slot is in ``[0, num_slots)``, and the value
    written for one that does not run: 0.0 for padding (a negative slot), NaN for an
    out-of-range slot (reachable only when the host check was skipped)."""
    valid = (slot_ids >= 0) & (slot_ids < num_slots)
    fill = torch.where(slot_ids < 0, 0.0, float("nan")).to(torch.float32)
    return valid, fill


def gather_slot_states(state_cache, slot_ids):
    """``state_cache[slot_ids]`` (fp32 ``[N, H, D, Dv]``) without a host sync: 0 for a padding
    (negative) slot, NaN for an out-of-range one."""
    S = state_cache.shape[0]
    valid, fill = slot_fill(slot_ids, S)
    if S == 0:
        return fill[:, None, None, None].expand(-1, *state_cache.shape[1:]).clone()
    rows = state_cache.index_select(0, torch.where(valid, slot_ids, 0).long())
    return torch.where(valid[:, None, None, None], rows, fill[:, None, None, None])


def scatter_slot_states_(state_cache, slot_ids, states):
    """``state_cache[slot_ids[n]] = states[n]`` in place for every valid (in-range, non-negative)
    slot, other entries untouched, without a host sync (no boolean indexing): rows that must not
    write are pointed at the slot of the first valid row and carry that row's very value, so the
    duplicate writes agree whatever their order (or at slot 0, rewriting its own value)."""
    S, N = state_cache.shape[0], slot_ids.shape[0]
    if S == 0 or N == 0:
        return state_cache
    valid, _ = slot_fill(slot_ids, S)
    idx = torch.where(valid, slot_ids, 0).long()
    first = valid.int().argmax()                      # the first valid row, or 0 when none
    any_valid = valid.any()
    pad_slot = torch.where(any_valid, idx[first], 0)
    pad_value = torch.where(any_valid, states[first].float(), state_cache[pad_slot])
    idx = torch.where(valid, idx, pad_slot)
    values = torch.where(valid[:, None, None, None], states.float(), pad_value)
    state_cache.index_put_((idx,), values)
    return state_cache


def padding_token_fill(o, slot_ids, num_slots, cu_seqlens=None):
    """``o [B, T, H, Dv]`` with the tokens of sequences that did not run (padding: 0; out-of-range
    slot: NaN) replaced, without a host sync."""
    valid, fill = slot_fill(slot_ids, num_slots)
    if cu_seqlens is None:
        return torch.where(valid[:, None, None, None], o, fill[:, None, None, None].to(o.dtype))
    T = o.shape[1]
    tok = torch.arange(T, device=o.device)
    seq = torch.searchsorted(cu_seqlens[1:].to(torch.int64), tok, right=True).clamp(max=slot_ids.shape[0] - 1)
    return torch.where(valid[seq][None, :, None, None], o, fill[seq][None, :, None, None].to(o.dtype))


def lightning_chunked_cached(q, k, v, slopes, state_cache, slot_ids, cu_seqlens=None, prefill=None):
    """The slot-cached prefill by gather → prefill → scatter (the torch backend, and the CUDA
    backend whose kernels have no slot indexing yet). Returns (o, final), final fp32 ``[N, H, D, Dv]``
    with 0 for padding sequences. ``prefill(q, k, v, slopes, initial_state, cu_seqlens)`` returns
    (o, final); default :func:`lightning_chunked`."""
    prefill = prefill or lightning_chunked
    S = state_cache.shape[0]
    init = gather_slot_states(state_cache, slot_ids)
    o, final = prefill(q, k, v, slopes, init, cu_seqlens)
    valid, fill = slot_fill(slot_ids, S)
    final = torch.where(valid[:, None, None, None], final, fill[:, None, None, None])
    scatter_slot_states_(state_cache, slot_ids, final)
    return padding_token_fill(o, slot_ids, S, cu_seqlens), final
